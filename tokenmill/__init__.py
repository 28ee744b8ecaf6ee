"""tokenmill: a paged-KV-cache LLM inference and serving engine."""

from tokenmill.config import EngineArgs
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.version import __version__


def __getattr__(name: str):
    # LLM pulls in the model stack; import it lazily so `import tokenmill` stays light.
    if name == "LLM":
        from tokenmill.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "EngineArgs", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "__version__"]
