"""The Llama-family runner and the checkpoint loading under it."""

from gateway.model.llama import LlamaRunner, RunnerSpec

__all__ = ["LlamaRunner", "RunnerSpec"]
