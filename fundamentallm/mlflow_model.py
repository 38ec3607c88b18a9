"""The MLflow pyfunc model, logged with MLflow's models-from-code: MLflow stores this file
(not a pickle) and runs it when the model is loaded.

Input: prompts, as a list of strings, a single string, or a DataFrame whose ``prompt``
column (or first column) holds them. Output: one generated continuation per prompt.
Parameters (all optional): ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
``seed``. Requests are bounded: at most `MAX_PROMPTS` prompts of `MAX_PROMPT_CHARS`
characters and `MAX_NEW_TOKENS` new characters each; a request beyond them is refused with
a clear message rather than run out of memory. The checkpoint is loaded on the CPU (a model
trained on a GPU samples anywhere) with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 8192
MAX_NEW_TOKENS = 4096

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


class CharLanguageModel(PythonModel):
    """Generates text from a FundamentaLLM checkpoint."""

    def load_context(self, context):  # no annotations: MLflow would read them as a schema
        from fundamentallm.checkpoint import load_checkpoint
        from fundamentallm.sample import Sampler

        checkpoint = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu")
        self.sampler = Sampler(checkpoint.build_model("cpu"), checkpoint.vocab)

    def predict(self, context, model_input, params=None):  # no annotations: MLflow would read them as a schema
        from fundamentallm.errors import FundamentaLLMError
        from fundamentallm.sample import SampleConfig

        settings = {**DEFAULT_PARAMS, **(params or {})}
        prompts = _prompts(model_input)
        if len(prompts) > MAX_PROMPTS:
            raise _refuse(f"{len(prompts)} prompts in one request; at most {MAX_PROMPTS}")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise _refuse(f"a prompt is longer than {MAX_PROMPT_CHARS} characters")
        if not 0 <= int(settings["max_new_tokens"]) <= MAX_NEW_TOKENS:
            raise _refuse(f"max_new_tokens must be between 0 and {MAX_NEW_TOKENS}")
        try:
            config = SampleConfig(
                max_new_tokens=int(settings["max_new_tokens"]),
                temperature=float(settings["temperature"]),
                top_k=int(settings["top_k"]),
                top_p=float(settings["top_p"]),
                seed=int(settings["seed"]),
                unknown="unk",
            )
        except (FundamentaLLMError, ValueError) as exc:
            raise _refuse(str(exc)) from exc
        return [self.sampler.generate(prompt, config)[0] for prompt in prompts]


mlflow.models.set_model(CharLanguageModel())
