"""config.pbtxt against Triton's own schema (tritonclient's model_config_pb2), for both profiles' builders.

Reading, writing and editing a config, validate_configs (names, the contract, the pipeline's
wiring), which the cpu and gpu repositories both pass, and how a repository holds its files. It lives here, beneath repository/cpu.py
and repository/gpu.py, so that neither builder imports the other.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medgemma_triton import contract

ALL_MODELS = (
    contract.PREPROCESSING_MODEL,
    contract.VISION_ENCODER_MODEL,
    contract.LLM_MODEL,
    contract.TOP_MODEL,  # a Python (BLS) model on the cpu profile: see serving/pipeline.py
)


CHECKPOINT_DIR = "checkpoint"  # in a model's version directory: the checkpoint files it serves with
# What serving reads from a checkpoint (medgemma_triton.spec, runtime.tokenizer, runtime.chat): no weights.
CHECKPOINT_SERVING_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
    "preprocessor_config.json",
)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (no second copy of a gigabyte export), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class RepositoryError(ValueError):
    """A model repository (template or generated) that Triton would refuse or wire wrongly."""


def read_config(path: str | Path) -> mc.ModelConfig:
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path}: not a valid Triton model config: {exc}") from None


def write_config(config: mc.ModelConfig, path: str | Path) -> None:
    text = text_format.MessageToString(config)
    text_format.Parse(text, mc.ModelConfig())  # what we write must read back
    Path(path).write_text(text, encoding="utf-8")


def load_configs(repository: str | Path) -> dict[str, mc.ModelConfig]:
    repository = Path(repository)
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        configs[path.parent.name] = read_config(path)
    if not configs:
        raise RepositoryError(f"{repository}: no */config.pbtxt files")
    return configs


def _data_type(triton_dtype: str) -> int:
    return mc.DataType.Value(f"TYPE_{triton_dtype}")


def tensor(config: mc.ModelConfig, name: str, *, output: bool = False):
    for t in config.output if output else config.input:
        if t.name == name:
            return t
    kind = "output" if output else "input"
    raise RepositoryError(f"model {config.name!r} has no {kind} {name!r}")


def set_dims(tensor, dims) -> None:
    del tensor.dims[:]
    tensor.dims.extend(int(d) for d in dims)


def set_parameter(config: mc.ModelConfig, key: str, value) -> None:
    config.parameters[key].string_value = str(value)


def contract_io(config: mc.ModelConfig) -> None:
    """Rewrite the `medgemma` model's inputs and outputs from the contract tables."""
    del config.input[:]
    del config.output[:]
    for t in contract.TOP_INPUTS:
        config.input.add(name=t.name, data_type=_data_type(t.triton_dtype), dims=t.dims, optional=t.optional)
    for t in contract.TOP_OUTPUTS:
        config.output.add(name=t.name, data_type=_data_type(t.triton_dtype), dims=t.dims)


def default_cache_dir(output: Path) -> Path:
    """Where a build caches its exports and engines when not told: beside the output."""
    return output.parent / f"{output.name}.artifacts"


def _io(config: mc.ModelConfig):
    return {t.name: t for t in config.input}, {t.name: t for t in config.output}


def _check_contract(config: mc.ModelConfig, problems: list[str]) -> None:
    inputs, outputs = _io(config)
    for t in contract.TOP_INPUTS:
        got = inputs.get(t.name)
        if got is None or got.data_type != _data_type(t.triton_dtype) or tuple(got.dims) != t.dims:
            problems.append(f"{config.name} input {t.name!r} does not match the contract")
        elif got.optional != t.optional:
            problems.append(f"{config.name} input {t.name!r}: optional must be {t.optional}")
    for t in contract.TOP_OUTPUTS:
        got = outputs.get(t.name)
        if got is None or got.data_type != _data_type(t.triton_dtype) or tuple(got.dims) != t.dims:
            problems.append(f"{config.name} output {t.name!r} does not match the contract")
    extra = sorted(set(inputs) - {t.name for t in contract.TOP_INPUTS})
    extra += sorted(set(outputs) - {t.name for t in contract.TOP_OUTPUTS})
    if extra:
        problems.append(f"{config.name} has inputs/outputs outside the contract: {extra}")


def _check_link(configs, source: str, target: str, names, problems: list[str], *, source_is_output=True) -> None:
    """Each name is an output (or input) of `source` and an input of `target`, with the same dtype."""
    src_inputs, src_outputs = _io(configs[source])
    tgt_inputs, _ = _io(configs[target])
    produced = src_outputs if source_is_output else src_inputs
    for name in names:
        if name not in produced:
            problems.append(f"{source} has no {'output' if source_is_output else 'input'} {name!r} for {target}")
        elif name not in tgt_inputs:
            problems.append(f"{target} has no input {name!r} (sent by {source})")
        elif produced[name].data_type != tgt_inputs[name].data_type:
            problems.append(f"{source}.{name} -> {target}.{name}: data types differ")
        elif not source_is_output and produced[name].optional and not tgt_inputs[name].optional:
            problems.append(f"{target}.{name} is required but {source}.{name} is optional")


def validate_configs(configs: dict[str, mc.ModelConfig]) -> None:
    """Check what a schema parse cannot: names, the contract, and the pipeline's wiring.

    The wiring is the internal contract's tables (contract.py): which request inputs go to which model, and which
    outputs flow on. A missing or mistyped link fails here, not at the first request.
    """

    problems = []
    for name, config in configs.items():
        if config.name != name:
            problems.append(f"{name}/config.pbtxt says name: {config.name!r}")
    missing = [m for m in ALL_MODELS if m not in configs]
    if missing:
        raise RepositoryError(f"missing models: {', '.join(missing)}")
    top = configs[contract.TOP_MODEL]
    _check_contract(top, problems)
    for name, why in ((contract.TOP_MODEL, "it streams"), (contract.LLM_MODEL, "it answers from its engine's threads"),
                      (contract.PREPROCESSING_MODEL, "it answers from its lanes' threads")):
        if not configs[name].model_transaction_policy.decoupled:
            problems.append(f"{name} must be decoupled ({why})")

    _check_link(configs, contract.TOP_MODEL, contract.PREPROCESSING_MODEL, contract.PREPROCESSING_INPUTS, problems, source_is_output=False)
    _check_link(configs, contract.TOP_MODEL, contract.LLM_MODEL, contract.LLM_REQUEST_INPUTS, problems, source_is_output=False)
    _check_link(configs, contract.PREPROCESSING_MODEL, contract.LLM_MODEL, (contract.INPUT_IDS,), problems)
    _check_link(configs, contract.PREPROCESSING_MODEL, contract.VISION_ENCODER_MODEL, (contract.VISION_INPUT,), problems)
    _check_link(configs, contract.VISION_ENCODER_MODEL, contract.LLM_MODEL, (contract.VISION_OUTPUT,), problems)
    pre_inputs, _ = _io(configs[contract.PREPROCESSING_MODEL])
    for name in contract.PREPROCESSING_SET_HERE:
        if name not in pre_inputs:
            problems.append(f"preprocessing has no {name!r} input (medgemma sends it)")
    llm_inputs, llm_outputs = _io(configs[contract.LLM_MODEL])
    for name in (contract.LLM_STREAM_INPUT,) + contract.LLM_CONTROL_INPUTS:
        if name not in llm_inputs:
            problems.append(f"llm has no {name!r} input (medgemma sends it)")
    extra = sorted(set(llm_inputs) - set(contract.LLM_INPUTS) - set(contract.LLM_CONTROL_INPUTS))
    if extra:
        problems.append(f"llm has inputs medgemma never sends: {extra}")
    _, top_outputs = _io(top)
    for name in contract.LLM_OUTPUTS:
        if name not in llm_outputs:
            problems.append(f"llm has no output {name!r} (medgemma reads it)")
        elif name in top_outputs and llm_outputs[name].data_type != top_outputs[name].data_type:
            problems.append(f"llm.{name} and {contract.TOP_MODEL}.{name} have different data types")
    for t in contract.TOP_OUTPUTS:
        if t.name not in contract.TO_CLIENT:
            problems.append(f"contract output {t.name!r} is produced by no model")

    vision = configs[contract.VISION_ENCODER_MODEL]
    if vision.max_batch_size < 1:
        problems.append("vision_encoder needs max_batch_size >= 1 (it batches images dynamically)")
    if not vision.HasField("dynamic_batching"):
        problems.append("vision_encoder needs dynamic_batching (images of concurrent requests batch together)")
    pre_outputs = _io(configs[contract.PREPROCESSING_MODEL])[1]
    vision_inputs, vision_outputs = _io(vision)
    if contract.VISION_INPUT in pre_outputs and contract.VISION_INPUT in vision_inputs:
        if tuple(pre_outputs[contract.VISION_INPUT].dims[1:]) != tuple(vision_inputs[contract.VISION_INPUT].dims):
            problems.append("preprocessing's pixel_values rows differ from vision_encoder's input")
    if contract.VISION_OUTPUT in vision_outputs and contract.VISION_OUTPUT in llm_inputs:
        if tuple(llm_inputs[contract.VISION_OUTPUT].dims[1:]) != tuple(vision_outputs[contract.VISION_OUTPUT].dims):
            problems.append("vision_encoder's image_embeddings rows differ from the llm's input")
    if problems:
        raise RepositoryError("invalid model repository:\n  " + "\n  ".join(problems))
