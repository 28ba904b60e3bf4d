"""Stage runs in MLflow: flattened params, the config artifact, masking, nesting under a parent run."""

import mlflow
from conftest import compose

from pipelines.tracking import flatten, redact, stage_run


def test_secret_looking_keys_are_masked_everywhere_in_the_tree():
    tree = {"storage": {"endpoint_url": "http://x", "secret_access_key": "s", "nested": [{"api_key": "k"}]}}
    assert redact(tree) == {"storage": {"endpoint_url": "http://x", "secret_access_key": "***",
                                        "nested": [{"api_key": "***"}]}}
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
