"""Stage runs in MLflow: flattened params, the config artifact, masking, nesting under a parent run."""

import mlflow

from pipelines.driver.config import compose
from pipelines.driver.tracking import flatten, redact, stage_run


def test_secrets_are_masked_in_keys_env_pairs_and_urls_but_settings_stay_visible():
    tree = {
        "storage": {"endpoint_url": "http://x", "aws_secret_access_key": "s", "nested": [{"hf_token": "k"}]},
        "runtime_env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "s2"}, {"name": "OMP_NUM_THREADS", "value": "2"}],
        "tracking": {"uri": "https://alice:pa55@mlflow.example.com:5000/path"},
        "tokenizer": {"name_or_path": "bert-base-uncased", "max_tokens": 77},
    }
    assert redact(tree) == {
        "storage": {"endpoint_url": "http://x", "aws_secret_access_key": "***", "nested": [{"hf_token": "***"}]},
        "runtime_env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "***"}, {"name": "OMP_NUM_THREADS", "value": "2"}],
        "tracking": {"uri": "https://***@mlflow.example.com:5000/path"},
        "tokenizer": {"name_or_path": "bert-base-uncased", "max_tokens": 77},
    }
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}


def test_a_stage_run_started_inside_another_is_nested_under_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cfg = compose("stage=synthesize", f"tracking.uri={uri}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("nesting")
    with mlflow.start_run(run_name="pipeline") as parent:
        with stage_run(cfg, "synthesize") as child:
            pass
    child = mlflow.MlflowClient(uri).get_run(child.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.run_name == "synthesize"
    assert child.data.params["stage.name"] == "synthesize"
    assert child.data.params["cluster.address"] == "local"
