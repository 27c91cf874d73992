"""Pure-torch model code: no I/O, no environment, no arguments."""

from clipjob.model.clip import CLIP, CLIPOutput, build_model, build_tokenizer

__all__ = ["CLIP", "CLIPOutput", "build_model", "build_tokenizer"]
