"""Bad campaign files are refused by ``kleinfarm submit`` with one line naming the file (and line) and
the problem, and exit status 2: never a traceback, never a half-read million jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kleinfarm.shared.jobs import MAX_JOBS_PER_CAMPAIGN

KLEINFARM = [sys.executable, "-m", "kleinfarm.producer"]
# Nothing listens here: a file that loaded by mistake would fail on Redis, with another message.
NO_FARM = {"KLEINFARM_REDIS_URL": "redis://127.0.0.1:9/0", "KLEINFARM_S3_ENDPOINT_URL": "http://127.0.0.1:9"}

BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "latin-1 YAML": ("c.yaml", b"name: c\njobs:\n  - prompt: caf\xe9\n", "c.yaml: not UTF-8 text: byte 0xe9"),
    "latin-1 JSONL": (
        "c.jsonl",
        b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n',
        "c.jsonl:2: not UTF-8 text: byte 0xe9",
    ),
    "5,000 nested brackets in YAML": ("c.yaml", b"name: c\njobs: " + b"[" * 5000 + b"\n", "c.yaml: nested deeper"),
    "5,000 nested brackets in JSONL": ("c.jsonl", b'{"prompt": "a"}\n' + b"[" * 5000 + b"\n", "c.jsonl:2: nested"),
    "nesting below the recursion limit": (
        "c.jsonl",
        b'{"prompt": "a", "seed": ' + b"[" * 100 + b"]" * 100 + b"}\n",
        "c.jsonl:1: seed" + "[0]" * 31 + " is nested deeper than 32 levels",
    ),
    "a number as a key": ("c.yaml", b"name: c\n1: x\njobs:\n  - prompt: a\n", "c.yaml: key 1 is not a string"),
    "a number as a job's key": (
        "c.yaml",
        b"name: c\njobs:\n  - prompt: a\n    2: b\n",
        "c.yaml: jobs[0]: key 2 is not a string",
    ),
    "an unknown top-level key": (
        "c.yaml",
        b"name: c\nraw_jobs: []\njobs:\n  - prompt: a\n",
        "c.yaml: unknown top-level key 'raw_jobs'",
    ),
    "a list, not a mapping": ("c.yaml", b"- prompt: a\n", "c.yaml: a YAML campaign is a mapping with a 'jobs' list"),
    "jobs not a list": (
        "c.yaml",
        b"name: c\njobs: {prompt: a}\n",
        "c.yaml: a YAML campaign is a mapping with a 'jobs'",
    ),
    "defaults not a mapping": (
        "c.yaml",
        b"name: c\ndefaults: [1]\njobs:\n  - prompt: a\n",
        "c.yaml: 'defaults' must be a mapping",
    ),
    "broken YAML": ("c.yaml", b"name: c\njobs: [ {prompt: a\n", "c.yaml: not valid YAML: expected ',' or '}'"),
    "a JSONL line without a line break for ever": (
        "c.jsonl",
        b'{"prompt": "' + b"a" * 300_000 + b'"}',
        "c.jsonl:1: longer than 262144 bytes",
    ),
}


def submit(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KLEINFARM, "submit", str(path)],
        env={**os.environ, **NO_FARM},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_campaign_file_is_refused_with_one_line_naming_it(tmp_path: Path, case: str) -> None:
    name, content, expected = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    assert_one_line_refusal(submit(path), f"{tmp_path}/{expected}")


def test_a_campaign_over_the_job_cap_is_refused_naming_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("w") as out:
        for _ in range(MAX_JOBS_PER_CAMPAIGN + 1):
            out.write('{"prompt": "a mug", "width": 256, "height": 256}\n')
    result = submit(path)
    assert_one_line_refusal(result, f"huge.jsonl:{MAX_JOBS_PER_CAMPAIGN + 1}: more than {MAX_JOBS_PER_CAMPAIGN} jobs")
    assert "MAX_JOBS_PER_CAMPAIGN" in result.stderr
