"""Hand-made inputs for the sampler and penalty tests: requests and rows of logits."""

import torch

from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

EOS = 0


def req(prompt=(5,), output=(), rid="r", **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params), output_token_ids=list(output))


def rows(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
