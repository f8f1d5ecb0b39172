"""A small, license-clean calibration set for post-training quantization: medical text and
image-conditioned chats, instead of ModelOpt's default news text (cnn_dailymail).

Source and licence: every text below was written for this package (Apache-2.0, like the package);
none is copied from a dataset, a textbook or a patient record, and no real patient is described.
The images are synthetic, drawn from a seed with numpy (radiograph-, CT-, dermoscopy- and
histology-like textures): they exercise the image-token path and the projector's output range,
not medical content. Size: 48 text passages and 16 image questions; `calibration_chats` combines
them with 6 system prompts into as many chats as asked (default 128: 64 text-only, 64 with one image).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SYSTEM_PROMPTS = (
    "You are an expert radiologist.",
    "You are a careful clinical assistant. Answer concisely and state uncertainty.",
    "You are a pathologist reviewing slides for a tumour board.",
    "You are a dermatologist answering a colleague's question.",
    "You are a medical educator explaining findings to a resident.",
    "You summarise clinical documents for physicians.",
)

MEDICAL_TEXTS = (
    "Findings: The lungs are clear without focal consolidation, effusion or pneumothorax. The cardiomediastinal silhouette is within normal limits. No acute osseous abnormality.",
    "Impression: Right lower lobe airspace opacity, compatible with pneumonia in the appropriate clinical setting. Recommend follow-up radiograph in 6 to 8 weeks to document resolution.",
    "CT abdomen with contrast: a 2.3 cm hypodense lesion in hepatic segment VII demonstrates peripheral nodular enhancement with centripetal fill-in, most consistent with a haemangioma.",
    "MRI brain: there are scattered T2/FLAIR hyperintense foci in the periventricular and subcortical white matter, nonspecific but commonly seen with chronic small vessel ischaemic change.",
    "The patient is a 67-year-old man with a 40 pack-year smoking history presenting with progressive exertional dyspnoea and a dry cough for three months.",
    "Echocardiogram: left ventricular ejection fraction is estimated at 35 percent with global hypokinesis. Mild mitral regurgitation. No pericardial effusion.",
    "Discharge summary: admitted with community-acquired pneumonia, treated with intravenous ceftriaxone and oral azithromycin, transitioned to oral amoxicillin-clavulanate on day three.",
    "Histopathology: sections show infiltrating ductal carcinoma, Nottingham grade 2, with lymphovascular invasion present. Margins are negative; the closest margin is 3 mm.",
    "Dermatology consult: a 7 mm asymmetric pigmented macule with irregular borders and two shades of brown on the left upper back; excisional biopsy is recommended.",
    "Laboratory results: haemoglobin 9.8 g/dL, mean corpuscular volume 74 fL, ferritin 8 ng/mL, consistent with iron deficiency anaemia.",
    "The differential diagnosis for a solitary pulmonary nodule includes granuloma, hamartoma, primary lung carcinoma and metastasis; size, margins and growth over time guide management.",
    "Ultrasound of the right upper quadrant shows gallbladder wall thickening to 5 mm, pericholecystic fluid and a positive sonographic Murphy sign, suggestive of acute cholecystitis.",
    "Knee radiographs demonstrate medial joint space narrowing, subchondral sclerosis and marginal osteophytes, in keeping with moderate osteoarthritis.",
    "Mammography: heterogeneously dense breast tissue. A new 9 mm irregular mass with spiculated margins in the upper outer quadrant of the left breast. BI-RADS 4C.",
    "Fundus photograph: scattered dot and blot haemorrhages, hard exudates near the macula and cotton wool spots, findings of moderate non-proliferative diabetic retinopathy.",
    "Chest CT angiography: filling defects within the right main and left lower lobe pulmonary arteries consistent with acute pulmonary embolism. The RV to LV ratio is 1.1.",
    "Plan: start apixaban 10 mg twice daily for seven days then 5 mg twice daily; reassess renal function and bleeding risk at follow-up.",
    "The nasogastric tube tip projects over the gastric body. The endotracheal tube terminates 4 cm above the carina. A right internal jugular catheter ends in the superior vena cava.",
    "Lumbar spine MRI: a broad-based disc protrusion at L4-L5 contacts the traversing left L5 nerve root with mild narrowing of the left lateral recess.",
    "Sepsis is suspected when infection is accompanied by acute organ dysfunction; early antibiotics, source control and haemodynamic support improve outcomes.",
    "Frontal and lateral views of the chest show hyperinflated lungs with flattened hemidiaphragms and increased retrosternal airspace, consistent with emphysema.",
    "Colonoscopy: a 12 mm sessile polyp in the ascending colon was removed by piecemeal endoscopic mucosal resection. Histology showed a tubulovillous adenoma with low-grade dysplasia.",
    "Question: what are the radiographic signs of congestive heart failure? Answer: cardiomegaly, upper lobe venous diversion, interstitial oedema with Kerley B lines, and pleural effusions.",
    "Skin biopsy shows a proliferation of atypical melanocytes at the dermoepidermal junction with pagetoid spread; Breslow thickness is 0.6 mm without ulceration.",
    "Renal ultrasound: the right kidney measures 11.2 cm with moderate hydronephrosis; a 6 mm echogenic focus with posterior acoustic shadowing is seen at the ureteropelvic junction.",
    "Pediatric elbow radiograph: a posterior fat pad sign is present without a visible fracture line; an occult supracondylar fracture should be suspected.",
    "Thyroid ultrasound: a 1.8 cm solid hypoechoic nodule with microcalcifications and taller-than-wide shape, TI-RADS 5; fine-needle aspiration is recommended.",
    "ECG: sinus rhythm at 88 beats per minute, ST elevation in leads II, III and aVF with reciprocal depression in I and aVL, consistent with an acute inferior myocardial infarction.",
    "Head CT without contrast: a hyperdense crescentic collection along the right convexity measuring 8 mm with 4 mm of leftward midline shift, compatible with an acute subdural haematoma.",
    "The patient reports intermittent palpitations and lightheadedness. A 14-day ambulatory monitor showed paroxysmal atrial fibrillation with a burden of 6 percent.",
    "Pathology: the lymph node shows effacement of normal architecture by sheets of large atypical lymphoid cells positive for CD20 and BCL6, consistent with diffuse large B-cell lymphoma.",
    "Bone scan: multiple foci of increased radiotracer uptake in the thoracic spine, ribs and pelvis, in a pattern suspicious for osseous metastatic disease.",
    "Summarise: 54-year-old woman, type 2 diabetes on metformin, HbA1c 8.4 percent, eGFR 72, blood pressure 146/92; discuss intensifying therapy and adding an ACE inhibitor.",
    "Shoulder MRI: full-thickness tear of the supraspinatus tendon with 1.5 cm of retraction and mild fatty atrophy of the muscle belly.",
    "The clinical significance of an incidental adrenal nodule depends on its size, attenuation on unenhanced CT and washout characteristics; lesions under 10 Hounsfield units are usually adenomas.",
    "Abdominal radiograph: multiple dilated loops of small bowel with air-fluid levels and a paucity of colonic gas, suggestive of small bowel obstruction.",
    "Cytology: the pleural fluid contains clusters of malignant epithelial cells; immunostains are positive for TTF-1 and napsin A, supporting a lung adenocarcinoma primary.",
    "Patient education: after a minor head injury, return to the emergency department for worsening headache, repeated vomiting, confusion, weakness or seizures.",
    "PET-CT: a hypermetabolic right hilar mass with SUVmax 11.4 and an FDG-avid subcarinal lymph node; no distant metastatic disease is identified.",
    "Wrist radiograph: a transverse fracture of the distal radial metaphysis with dorsal angulation of 20 degrees and an associated ulnar styloid fracture.",
    "Dermoscopy shows a regular pigment network, symmetric structure and a single colour, features favouring a benign melanocytic naevus.",
    "Cardiac MRI: late gadolinium enhancement in a subendocardial pattern within the left anterior descending artery territory, indicating prior infarction with limited viability.",
    "Portable chest radiograph: bilateral diffuse airspace opacities, more pronounced in the dependent lung zones, in a patient with suspected acute respiratory distress syndrome.",
    "Frozen section: benign fibroadipose tissue with no evidence of malignancy; final diagnosis deferred to permanent sections.",
    "Pelvic ultrasound: a 4.5 cm unilocular anechoic left adnexal cyst with thin walls and no internal vascularity, most likely a simple follicular cyst.",
    "Explain to a patient: a CT scan uses X-rays from many angles to build cross-sectional images; contrast dye helps show blood vessels and organs more clearly.",
    "Pulmonary function tests show an FEV1/FVC ratio of 0.62 with FEV1 at 58 percent predicted and no significant bronchodilator response, consistent with moderate COPD.",
    "Handover: bed 12, post-operative day one after laparoscopic appendicectomy, afebrile, tolerating fluids, analgesia adequate, plan for discharge tomorrow if eating.",
)

IMAGE_QUESTIONS = (
    "Describe this X-ray.",
    "What are the key findings in this image?",
    "Is there any abnormality in this radiograph? Explain.",
    "Write a brief radiology report for this image.",
    "Describe the structures visible in this CT slice.",
    "What does this skin lesion look like, and what would you recommend?",
    "Describe the tissue architecture in this histology image.",
    "List three differential diagnoses based on this image.",
    "Is the image quality adequate for interpretation?",
    "Compare the left and right sides of this image.",
    "What imaging modality is this, and what body part is shown?",
    "Summarise the findings for a referring clinician in two sentences.",
    "Are there any devices or lines visible?",
    "What follow-up imaging would you suggest?",
    "Describe the colour and texture of the lesion.",
    "Explain these findings to the patient in plain language.",
)

IMAGE_KINDS = ("radiograph", "ct", "dermoscopy", "histology")


@dataclass(frozen=True)
class CalibrationChat:
    """One chat in MedGemma model-card format; `image` (a PIL image) fills the chat's image part."""

    messages: list
    image: object | None = None


def synthetic_image(kind: str, size: int, seed: int):
    """A deterministic, synthetic medical-looking image (PIL RGB, `size` x `size`)."""
    import numpy as np
    from PIL import Image

    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown synthetic image kind {kind!r}; one of {IMAGE_KINDS}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    noise = rng.normal(0.0, 0.04, (size, size))
    if kind in ("radiograph", "ct"):
        body = ((x / 0.42) ** 2 + (y / 0.47) ** 2 < 1).astype(float)
        if kind == "radiograph":
            lungs = sum(((x - dx) / 0.15) ** 2 + ((y + 0.02) / 0.3) ** 2 < 1 for dx in (-0.17, 0.17))
            ribs = (np.sin((y + 0.5) * 40 + np.abs(x) * 6) > 0.85) & (np.abs(x) < 0.35)
            gray = 0.55 * body - 0.35 * lungs + 0.25 * ribs + 0.15 * (np.abs(x) < 0.03)
        else:
            organs = sum(
                (((x - rng.uniform(-0.2, 0.2)) / r) ** 2 + ((y - rng.uniform(-0.2, 0.2)) / r) ** 2 < 1) * rng.uniform(0.1, 0.4)
                for r in rng.uniform(0.05, 0.15, 5)
            )
            gray = 0.4 * body + organs + 0.5 * (((x / 0.06) ** 2 + ((y - 0.3) / 0.06) ** 2) < 1)
        gray = np.clip(gray + noise, 0, 1)
        rgb = np.stack([gray] * 3, axis=-1)
    elif kind == "dermoscopy":
        r = np.sqrt(x**2 + y**2) * (1 + 0.2 * np.sin(6 * np.arctan2(y, x) + rng.uniform(0, math.tau)))
        lesion = np.clip(1.2 - r / 0.25, 0, 1)
        rgb = np.stack([0.85 - 0.5 * lesion, 0.65 - 0.45 * lesion, 0.55 - 0.4 * lesion], axis=-1)
        rgb = np.clip(rgb + noise[..., None], 0, 1)
    else:  # histology: pink stroma with purple nuclei
        rgb = np.stack([np.full_like(x, 0.92), np.full_like(x, 0.7), np.full_like(x, 0.82)], axis=-1)
        for cx, cy, radius in zip(rng.uniform(-0.5, 0.5, 300), rng.uniform(-0.5, 0.5, 300), rng.uniform(0.005, 0.02, 300)):
            nucleus = ((x - cx) ** 2 + (y - cy) ** 2) < radius**2
            rgb[nucleus] = (0.35, 0.2, 0.55)
        rgb = np.clip(rgb + noise[..., None], 0, 1)
    return Image.fromarray((rgb * 255).astype("uint8"), mode="RGB")


def calibration_chats(num_text: int = 64, num_image: int = 64, image_size: int = 512, seed: int = 0) -> list[CalibrationChat]:
    """`num_text` text-only chats and `num_image` chats with one synthetic image, deterministic in `seed`."""
    rng = random.Random(seed)
    chats = []
    for i in range(num_text):
        system = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
        text = MEDICAL_TEXTS[i % len(MEDICAL_TEXTS)]
        ask = rng.choice(("Summarise this for a colleague:", "Explain the key points:", "Continue this note:", "Review:"))
        chats.append(CalibrationChat(messages=[
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": f"{ask} {text}"}]},
        ]))
    for i in range(num_image):
        kind = IMAGE_KINDS[i % len(IMAGE_KINDS)]
        chats.append(CalibrationChat(
            messages=[
                {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]}]},
                {"role": "user", "content": [
                    {"type": "text", "text": IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)]},
                    {"type": "image"},
                ]},
            ],
            image=synthetic_image(kind, image_size, seed * 100_003 + i),
        ))
    return chats
