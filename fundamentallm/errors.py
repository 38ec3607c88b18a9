"""Exceptions that carry a message meant for the user.

Every error the library raises on purpose derives from `FundamentaLLMError`; the CLI
prints its message on one line and exits non-zero, anything else is a bug and keeps
its traceback.
"""


class FundamentaLLMError(Exception):
    """Base class for errors caused by input, configuration or environment."""

    exit_code = 1


class ConfigError(FundamentaLLMError, ValueError):
    """A configuration value or key is invalid (a ValueError too, so validators such as
    pydantic, which Prefect uses for flow parameters, report it as a validation error)."""

    exit_code = 2


class CorpusError(FundamentaLLMError):
    """A corpus source cannot be read or holds no usable text."""


class DownloadError(CorpusError):
    """A download failed in a way that may pass on its own (network, server error); worth a retry."""


class DataValidationError(FundamentaLLMError):
    """The documents table failed one or more expectations.

    `failures` lists one human-readable line per failed expectation; `report_path`
    points to the full validation result written before raising.
    """

    def __init__(self, message: str, failures: list[str], report_path: str | None = None):
        super().__init__(message)
        self.failures = failures
        self.report_path = report_path


class DatasetError(FundamentaLLMError):
    """An encoded dataset (manifest, vocab or shard) is missing, corrupt or inconsistent."""


class CheckpointError(FundamentaLLMError):
    """A checkpoint is missing, unsafe, corrupt, or does not fit the data or model it is used with."""


class RegistryError(FundamentaLLMError):
    """The model registry cannot complete a registration (e.g. its champion lock is stuck)."""


class TrackingUnavailable(FundamentaLLMError):
    """The MLflow tracking server cannot be reached."""


class TrainingDiverged(FundamentaLLMError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(FundamentaLLMError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    exit_code = 130
