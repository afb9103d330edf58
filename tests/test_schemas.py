"""Bad input is refused at submit time with a message naming the field and the limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from kleinfarm.producer.campaign_files import load_campaign
from kleinfarm.producer.client import prepare_jobs
from kleinfarm.producer.uploads import ReferenceUploader, campaign_references, local_references
from kleinfarm.shared.errors import CampaignFileError, JobSpecError
from kleinfarm.shared.jobs import Campaign, EditJob, GenerateJob, describe_validation_error
from kleinfarm.shared.refset import reference_set_key
from kleinfarm.shared.storage import Storage

EXAMPLES = Path(__file__).parent.parent / "examples"


def error_text(raw_jobs: list[dict[str, object]]) -> str:
    with pytest.raises(ValidationError) as caught:
        Campaign.from_raw("bad", raw_jobs)
    return describe_validation_error(caught.value)


def test_an_empty_prompt_is_refused_naming_the_field() -> None:
    assert error_text([{"prompt": "   "}]) == "jobs[0].prompt: prompt is empty"


@pytest.mark.parametrize(
    ("side", "expected"),
    [
        (1000, "width=1000 is not a multiple of 16"),
        (240, "width=240 is out of range: it must be between 256 and 2048"),
        (2064, "width=2064 is out of range: it must be between 256 and 2048"),
    ],
)
def test_a_bad_side_is_refused_naming_the_limit(side: int, expected: str) -> None:
    assert error_text([{"prompt": "p"}, {"prompt": "p", "width": side}]) == f"jobs[1].width: {expected}"


def test_more_than_four_references_are_refused() -> None:
    text = error_text([{"prompt": "p", "references": [f"s3://b/{i}.png" for i in range(5)]}])
    assert text.startswith("jobs[0].references: List should have at most 4 items")


def test_an_unknown_field_is_refused_by_name() -> None:
    assert error_text([{"prompt": "p", "colour": "red"}]) == "jobs[0].colour: unknown field"


def test_a_url_scheme_other_than_s3_https_or_local_is_refused() -> None:
    text = error_text([{"prompt": "p", "references": ["ftp://host/a.png"]}])
    assert "jobs[0].references: reference 'ftp://host/a.png' has scheme 'ftp'" in text


def test_a_missing_local_reference_is_refused_at_submit(tmp_path: Path) -> None:
    campaign = Campaign.from_raw("c", [{"prompt": "p", "references": [str(tmp_path / "nope.png")]}])
    uploader = ReferenceUploader(Storage(client=None, bucket="farm"), "refs", max_bytes=1000, max_pixels=10**6)
    with pytest.raises(JobSpecError, match=r"jobs\[0\]\.references\[0\]: .*nope.png does not exist"):
        uploader.upload(local_references(campaign_references(campaign)))  # checked before storage is reached


def test_duplicate_job_ids_are_refused() -> None:
    campaign = Campaign.from_raw("c", [{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}])
    with pytest.raises(JobSpecError, match=r"jobs\[1\]\.id: duplicate id 'a'"):
        prepare_jobs(campaign)


def test_a_job_without_a_seed_gets_one_at_submit_and_keeps_a_given_one() -> None:
    campaign = Campaign.from_raw("c", [{"prompt": "p"}, {"prompt": "p", "seed": 7}])
    drawn, given = prepare_jobs(campaign)
    assert isinstance(drawn.spec["seed"], int) and drawn.fields["seed"] == str(drawn.spec["seed"])
    assert given.spec["seed"] == 7


def test_defaults_apply_and_references_make_an_edit() -> None:
    campaign = Campaign.from_raw(
        "c", [{"prompt": "p"}, {"prompt": "q", "kind": "generate"}], defaults={"width": 512, "references": ["a.png"]}
    )
    edit, generate = campaign.jobs
    assert isinstance(edit, EditJob) and edit.width == 512 and edit.references == ["a.png"]
    assert isinstance(generate, GenerateJob) and generate.width == 512


def test_the_yaml_example_loads_with_references_resolved_beside_it() -> None:
    campaign = load_campaign(EXAMPLES / "demo-campaign.yaml")
    edits = [job for job in campaign.jobs if isinstance(job, EditJob)]
    assert len(campaign.jobs) == 6 and len(edits) == 3
    assert all(Path(ref).is_file() for job in edits for ref in job.references)


def test_the_jsonl_example_loads_one_job_per_line() -> None:
    campaign = load_campaign(EXAMPLES / "bulk-edit.jsonl")
    assert campaign.name == "bulk-edit" and [job.id for job in campaign.jobs] == ["mug-1", "mug-2", "lamp-1", "plain-1"]


def test_invalid_yaml_is_refused_with_the_file_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\njobs: [ {prompt: a\n")
    with pytest.raises(CampaignFileError, match=r"broken.yaml: not valid YAML"):
        load_campaign(path)


def test_invalid_jsonl_is_refused_with_the_line_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(CampaignFileError, match=r"broken.jsonl:2: not valid JSON"):
        load_campaign(path)


def test_a_schema_error_in_a_file_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: c\njobs:\n  - prompt: a\n    height: 100\n")
    with pytest.raises(CampaignFileError, match=r"c.yaml: jobs\[0\]\.height: height=100 is out of range"):
        load_campaign(path)


def test_the_reference_set_key_follows_content_order_and_model() -> None:
    forward = reference_set_key("m", ["aa", "bb"])
    assert forward == reference_set_key("m", ["aa", "bb"])
    assert forward != reference_set_key("m", ["bb", "aa"])
    assert forward != reference_set_key("other-model", ["aa", "bb"])
    assert forward != reference_set_key("m", ["aa", "bb"], preprocessing="another")


def test_the_example_schedule_validates_and_a_bad_cron_is_refused() -> None:
    import yaml

    from kleinfarm.shared.schedules import Schedule

    document = yaml.safe_load((EXAMPLES / "schedule.yaml").read_text())
    assert Schedule.model_validate(document).cron == "0 2 * * *"
    with pytest.raises(ValidationError, match="must have 5 fields"):
        Schedule.model_validate({**document, "cron": "every night"})


def test_the_campaign_schema_refuses_more_jobs_than_the_cap_naming_it() -> None:
    from kleinfarm.shared.jobs import MAX_JOBS_PER_CAMPAIGN

    text = error_text([{"prompt": "p"}] * (MAX_JOBS_PER_CAMPAIGN + 1))
    assert text == (
        f"jobs: {MAX_JOBS_PER_CAMPAIGN + 1} jobs, over the limit of {MAX_JOBS_PER_CAMPAIGN} per campaign "
        "(MAX_JOBS_PER_CAMPAIGN): split them into several campaigns"
    )
    assert len(Campaign.from_raw("c", [{"prompt": "p"}] * MAX_JOBS_PER_CAMPAIGN).jobs) == MAX_JOBS_PER_CAMPAIGN


def test_a_yaml_campaign_over_the_cap_is_refused_before_its_jobs_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kleinfarm.shared.jobs.MAX_JOBS_PER_CAMPAIGN", 3)  # parsing 100,001 YAML jobs takes 25 s
    path = tmp_path / "c.yaml"
    path.write_text("name: c\njobs: [{prompt: a}, {prompt: b}, {prompt: c}, {width: 1}]\n")
    with pytest.raises(CampaignFileError, match=r"c.yaml: 4 jobs, over the limit of 3 per campaign"):
        load_campaign(path)


def test_a_schedule_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    from kleinfarm.producer.campaign_files import load_schedule

    path = tmp_path / "nightly.yaml"
    path.write_bytes(b"name: nightly\nprompt: caf\xe9\n")
    with pytest.raises(CampaignFileError, match=r"nightly.yaml: not UTF-8 text: byte 0xe9 at offset 25"):
        load_schedule(path)
