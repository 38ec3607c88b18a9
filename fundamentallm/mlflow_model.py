"""The MLflow pyfunc model, logged with MLflow's models-from-code: no pickle. MLflow stores a
small code file (`write_model_code`) that imports `CharLanguageModel` from here and hands an
instance to ``mlflow.models.set_model``, and runs that file when the model is saved and loaded;
this module only defines the class, so importing it registers nothing.

Input: prompts, as a list of strings, a single string, or a DataFrame whose ``prompt``
column (or first column) holds them. Output: one generated continuation per prompt.
Parameters (all optional): ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``seed``. Requests are bounded: at most `MAX_PROMPTS` prompts of `MAX_PROMPT_CHARS`
characters and `MAX_NEW_TOKENS` new characters each, `MAX_REQUEST_NEW_TOKENS` in all; a
request beyond them, or with a parameter that is not a number, out of range (a seed beyond
64 bits) or refused by `SampleConfig` (a temperature between 0 and `MIN_TEMPERATURE`, where
float32 sampling would divide by zero, among others), is refused with a message naming the
parameter (HTTP 400 when served) rather than run out of memory or fail inside the sampler.
The checkpoint is loaded on the CPU (a model trained on a GPU samples anywhere) with
``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.pyfunc import PythonModel

from fundamentallm.config import MIN_TEMPERATURE as MIN_TEMPERATURE  # the bound SampleConfig enforces

MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 8192
MAX_NEW_TOKENS = 4096
MAX_REQUEST_NEW_TOKENS = 8192
"""Characters generated for one request, all prompts together: keeps a request inside the
serving timeout (60 s by default) for models of a few million parameters on a CPU."""

DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 200, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "seed": 0}


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    columns = getattr(model_input, "columns", None)
    if columns is not None:
        column = "prompt" if "prompt" in columns else columns[0]
        values = list(model_input[column])
    else:
        values = list(model_input)
    return ["" if v is None else str(v) for v in values]


def _refuse(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _number(settings: dict[str, Any], name: str, kind: type) -> Any:
    value = settings[name]
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise _refuse(f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}") from None


class CharLanguageModel(PythonModel):
    """Generates text from a FundamentaLLM checkpoint."""

    def load_context(self, context):  # no annotations: MLflow would read them as a schema
        from fundamentallm.checkpoint import load_checkpoint
        from fundamentallm.sample import Sampler

        checkpoint = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu")
        self.sampler = Sampler(checkpoint.build_model("cpu"), checkpoint.vocab)

    # MLflow converts every input (a list, a string, a DataFrame, a served request) to a
    # DataFrame under the logged signature before calling predict: the hint says so, and a
    # DataFrame hint is one MLflow infers no schema from, so the logged signature stays the one
    # that describes the model (a list of prompts, the sampling parameters).
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        from fundamentallm.errors import FundamentaLLMError
        from fundamentallm.sample import SampleConfig

        settings = {**DEFAULT_PARAMS, **(params or {})}
        prompts = _prompts(model_input)
        if len(prompts) > MAX_PROMPTS:
            raise _refuse(f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > MAX_PROMPT_CHARS:
                raise _refuse(f"prompt {i} has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        max_new_tokens = _number(settings, "max_new_tokens", int)
        if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise _refuse(f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}; got {max_new_tokens}")
        if len(prompts) * max_new_tokens > MAX_REQUEST_NEW_TOKENS:
            raise _refuse(
                f"{len(prompts)} prompts x {max_new_tokens} new characters is more than the "
                f"{MAX_REQUEST_NEW_TOKENS} characters one request may generate; split the request"
            )
        temperature = _number(settings, "temperature", float)
        seed = _number(settings, "seed", int)
        if not -(2**63) <= seed < 2**64:
            raise _refuse(f"seed must be a 64-bit integer; got {seed}")
        try:
            config = SampleConfig(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=_number(settings, "top_k", int),
                top_p=_number(settings, "top_p", float),
                seed=seed,
                unknown="unk",
            )
        except (FundamentaLLMError, ValueError) as exc:
            raise _refuse(str(exc)) from exc
        return [self.sampler.generate(prompt, config)[0] for prompt in prompts]


MODEL_CODE_FILE = "fundamentallm_model.py"
"""The name of the code file in a saved model's directory."""

_MODEL_CODE = '''"""A FundamentaLLM model for MLflow's models-from-code; MLflow runs this file to load it."""

import mlflow

from fundamentallm.mlflow_model import CharLanguageModel

mlflow.models.set_model(CharLanguageModel())
'''


def write_model_code(directory: str | Path) -> Path:
    """Write the code file to pass as ``python_model`` to ``mlflow.pyfunc.save_model`` into
    `directory` (not the model's own path, which MLflow wants new) and return its path. It
    imports the package, so save the model with the package among its ``code_paths``."""
    from fundamentallm.fsutil import atomic_write_text

    path = Path(directory) / MODEL_CODE_FILE
    atomic_write_text(path, _MODEL_CODE)
    return path
