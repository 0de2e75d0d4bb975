"""The configuration file: defaults that give a working node, and errors that name the key."""

from pathlib import Path

import pytest

from appliance import config
from appliance.config import DEFAULT_ROUTE, ConfigError, load, parse

EXAMPLE = Path(config.__file__).with_name("appliance.example.toml")


def test_no_file_gives_the_documented_defaults():
    cfg = load(None)
    assert (cfg.ae_title, cfg.port, cfg.quiet_seconds) == ("APPLIANCE", 11112, 5.0)
    assert (cfg.metrics_bind, cfg.metrics_port) == ("127.0.0.1", 9109)
    assert cfg.routes == (DEFAULT_ROUTE,)
    assert cfg.destinations == ()


def test_annotated_example_states_exactly_the_defaults():
    # The example documents every default: parsing it must give what no file gives.
    cfg = load(EXAMPLE)
    defaults = load(None)
    assert cfg.data_dir == EXAMPLE.parent / defaults.data_dir
    assert cfg.__class__(**{**cfg.__dict__, "data_dir": defaults.data_dir}) == defaults


def test_default_route_sends_chest_radiographs_to_the_demo_model_only():
    chest_dx = {"Modality": "DX", "BodyPartExamined": "CHEST", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1"}
    assert DEFAULT_ROUTE.matches(chest_dx)
    assert DEFAULT_ROUTE.matches({**chest_dx, "Modality": "CR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1"})
    assert not DEFAULT_ROUTE.matches({**chest_dx, "Modality": "CT"})
    assert not DEFAULT_ROUTE.matches({**chest_dx, "BodyPartExamined": "KNEE"})
    assert not DEFAULT_ROUTE.matches({**chest_dx, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"})


def test_routes_and_destinations_are_read(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text("""
[node]
ae_title = "EDGE1"
port = 11113
data_dir = "d"
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
[[routes]]
name = "ct-head"
models = ["ich"]
priority = "stat"
[routes.match]
Modality = ["ct"]
""")
    cfg = load(f)
    assert cfg.ae_title == "EDGE1" and cfg.data_dir == tmp_path / "d"
    assert cfg.destinations[0].ae_title == "ORTHANC" and cfg.destinations[0].port == 4242
    (route,) = cfg.routes
    assert route.priority == config.PRIORITIES["stat"]
    assert route.matches({"Modality": "CT"}) and not route.matches({"Modality": "MR"})


@pytest.mark.parametrize("doc, names", [
    ({"node": {"port": 70000}}, ["node.port", "70000", "1 to 65535"]),
    ({"node": {"ae_title": "A-TITLE-LONGER-THAN-16"}}, ["node.ae_title", "AE title"]),
    ({"node": {"prot": 104}}, ["node.prot", "unknown key"]),
    ({"completion": {"quiet_seconds": "5"}}, ["completion.quiet_seconds", "'5'", "a number"]),
    ({"metrics": {"bind": "localhost:9"}}, ["metrics.bind", "IP address"]),
    ({"routes": [{"name": "r", "models": ["m"], "match": {"PatientName": ["X"]}}]},
     ["PatientName", "Modality, BodyPartExamined, SOPClassUID"]),
    ({"routes": [{"name": "r", "models": ["m"], "priority": "asap"}]}, ["routes[0].priority", "'asap'", "stat"]),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h"}]}, ["destinations[0].port", "required"]),
    ({"nodes": {}}, ["unknown key nodes"]),
])
def test_wrong_key_or_value_names_the_key_value_and_expectation(doc, names):
    with pytest.raises(ConfigError) as e:
        parse(doc)
    for name in names:
        assert name in str(e.value)


def test_invalid_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[node\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load(f)


def test_inference_runtime_defaults_to_onnx_runtime_and_takes_only_known_runtimes():
    assert load(None).inference_runtime == "onnxruntime"
    assert parse({"inference": {"runtime": "auto"}}).inference_runtime == "auto"
    assert parse({"inference": {"runtime": "tensorrt"}}).inference_runtime == "tensorrt"
    with pytest.raises(ConfigError, match="inference.runtime.*'triton'.*onnxruntime"):
        parse({"inference": {"runtime": "triton"}})


def test_engines_are_kept_in_the_data_dir():
    assert parse({"node": {"data_dir": "/var/lib/appliance"}}).engines_dir == Path("/var/lib/appliance/engines")
