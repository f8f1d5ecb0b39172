"""The access log's formatter (named in gateway.server.LOG_CONFIG; uvicorn loads it by that name)."""

from __future__ import annotations

from copy import copy

from uvicorn.logging import AccessFormatter


class PathOnlyAccessFormatter(AccessFormatter):
    """uvicorn's access line with the request's path but not its query string, which can carry keys,
    identifiers or other text a caller did not mean for a log."""

    def formatMessage(self, record):
        client_addr, method, path_and_query, http_version, status_code = record.args
        record = copy(record)
        record.args = (client_addr, method, path_and_query.partition("?")[0], http_version, status_code)
        return super().formatMessage(record)
