"""The README's example job, run exactly as a new user would."""

from conftest import REPO


def test_example_job_runs_and_parks_the_two_missing_files(mrpool):
    r = mrpool.run("run", str(REPO / "examples/wordcount/job.yaml"), "--job-id", "example")
    assert r.stdout.splitlines()[0] == "example"
    assert r.returncode == 1, r.stderr  # two items are in the DLQ
    status = mrpool.status("example")
    assert (status["total"], status["succeeded"], status["dlq"], status["state"]) == (
        42,
        40,
        2,
        "completed_with_failures",
    )
    assert sorted(e["id"] for e in mrpool.dlq("example")) == ["missing-a", "missing-b"]
    results = mrpool.results("example")
    assert len(results) == 40 and len({r["id"] for r in results}) == 40
    assert all(r["result"]["words"] > 0 for r in results)
