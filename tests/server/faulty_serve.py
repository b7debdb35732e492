"""`tokenmill` with a fault injected into the model runner, for the live fault tests.

    python faulty_serve.py serve ...   # the same arguments as `tokenmill serve`

Any engine step that runs a request whose prompt starts with FAULT_PROMPT raises inside
`ModelRunner.execute`, as a bug or a resource failure would: the test sends that prompt (as
token ids to /v1/completions) to fail a step on purpose. Everything else is the real server.
"""

from __future__ import annotations

import sys

from tokenmill.cli import main
from tokenmill.runner.model_runner import ModelRunner

FAULT_PROMPT = [4242, 4242, 4242]

_execute = ModelRunner.execute


def _faulty_execute(self, sched_out):
    if any(s.request.prompt_token_ids[:3] == FAULT_PROMPT for s in sched_out.scheduled):
        raise RuntimeError("injected fault")
    return _execute(self, sched_out)


if __name__ == "__main__":
    ModelRunner.execute = _faulty_execute
    sys.exit(main(sys.argv[1:]))
