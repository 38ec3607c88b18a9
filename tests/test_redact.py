"""The one credential masker: what the tracker, the corpus sources and `make up` each masked."""

from __future__ import annotations

import pytest

from fundamentallm.redact import mask_credentials


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The tracker: any scheme, user:password or a user alone, anywhere in a longer text.
        ("postgresql://u:p@db/mlflow", "postgresql://***@db/mlflow"),
        ("https://token@example.org/api", "https://***@example.org/api"),
        (
            "cannot connect to postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow (timeout); "
            "artifacts at s3://key:secret@bucket/runs",
            "cannot connect to postgresql+psycopg2://***@db:5432/mlflow (timeout); artifacts at s3://***@bucket/runs",
        ),
        # The corpus sources: the host, path, query and pinning fragment stay readable.
        ("https://user:token@host/file.txt#sha256=ab12", "https://***@host/file.txt#sha256=ab12"),
        ("http://user:pw@127.0.0.1:8123/private.txt?x=1", "http://***@127.0.0.1:8123/private.txt?x=1"),
        # `make up`: up to the last "@", so an unencoded "@" (and ":") in a password is masked too.
        ("postgresql://u:p@ss:w@rd@db:5432/prefect", "postgresql://***@db:5432/prefect"),
        ("mysql://u:s3cret@db/mlflow", "mysql://***@db/mlflow"),
        ("postgresql://u:s3cret@db:5432", "postgresql://***@db:5432"),
        ("postgresql://app:pw-0f3a%40%2Fx@127.0.0.1:5432/mlflow", "postgresql://***@127.0.0.1:5432/mlflow"),
        # A "?" or "#" in a password does not end the authority early.
        ("https://u:p?ss#w@host/f", "https://***@host/f"),
        # Both maskers' cases at once, inside a message.
        (
            "FUNDAMENTALLM_PREFECT_DATABASE_URL=postgresql+asyncpg://u:a@b:c@db/prefect: expected ...",
            "FUNDAMENTALLM_PREFECT_DATABASE_URL=postgresql+asyncpg://***@db/prefect: expected ...",
        ),
    ],
)
def test_credentials_are_masked(text, expected):
    assert mask_credentials(text) == expected
    for secret in ("hunter2", "s3cret", "token", "secret", "p@ss", "w@rd", "pw-0f3a", "a@b:c"):
        if secret in text:
            assert secret not in mask_credentials(text)


@pytest.mark.parametrize(
    "text",
    [
        "https://example.org/file.txt",
        "s3://bucket/key@version",  # an "@" in the path is not userinfo
        "see https://example.org/x and write to someone@example.org",  # a URL ends at whitespace
        "someone@example.org",
        "./default",
        "builtin:default/keywords",
        "",
    ],
)
def test_text_without_credentials_is_unchanged(text):
    assert mask_credentials(text) == text


def test_the_tracker_the_sources_and_make_up_mask_a_password_holding_at_and_colon(monkeypatch):
    import importlib.util

    from conftest import ROOT

    from fundamentallm.data.sources import parse_pinned_url
    from fundamentallm.errors import CorpusError
    from fundamentallm.tracking import mask_credentials as tracking_mask

    # The tracker (it used to leave "ss:w@rd" of such a password in a tag).
    assert tracking_mask("run failed: postgresql://u:p@ss:w@rd@db/x gone") == "run failed: postgresql://***@db/x gone"

    # The corpus sources, in an error message.
    with pytest.raises(CorpusError) as caught:
        parse_pinned_url("https://u:p@ss:w@rd@host/f.txt#sha256=nothex")
    assert str(caught.value).startswith("https://***@host/f.txt#sha256=nothex: ")

    # `make up` (deployments/services.py), refusing a setting before anything starts.
    spec = importlib.util.spec_from_file_location("services_under_test", ROOT / "deployments" / "services.py")
    services = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services)
    monkeypatch.setenv("FUNDAMENTALLM_PREFECT_DATABASE_URL", "postgresql://u:p@ss:w@rd@db:5432")
    monkeypatch.delenv("FUNDAMENTALLM_MLFLOW_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as refused:
        services._database_urls()
    assert str(refused.value).startswith(
        "FUNDAMENTALLM_PREFECT_DATABASE_URL=postgresql://***@db:5432: name the database"
    )


def test_credentials_in_the_tracking_uri_are_masked_wherever_it_is_shown(monkeypatch, refusing_port):
    import subprocess
    import sys

    from conftest import ROOT

    from fundamentallm import tracking

    uri = f"http://ops:s3cret-Pw@127.0.0.1:{refusing_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once: no back-off to wait out
    masked = f"http://***@127.0.0.1:{refusing_port}"
    assert tracking.browse_lines() == [f"MLflow UI:   {masked}/{tracking.TRAINING_VIEW}"]
    assert tracking.store_description() == masked
    with pytest.raises(tracking.TrackingUnavailable) as caught, tracking.reporting_unreachable():
        tracking.client().get_experiment_by_name("x")
    assert str(caught.value).startswith(f"MLflow tracking server {masked} is unreachable")
    assert "s3cret-Pw" not in str(caught.value)
    # What a user of the CLI sees when the registry cannot be reached.
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "fundamentallm.cli", "sample", "--model", "models:/x@champion", "-n", "3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert masked in done.stdout + done.stderr and "s3cret-Pw" not in done.stdout + done.stderr
