"""TIPC: the config in the standard line layout (read by line number, as Paddle's
test_train_inference_python.sh reads it), and the lite chain (train -> eval -> export ->
infer on CPU) writing its verdicts where the tooling looks; failures fail the run."""
import os
import subprocess

import pytest

from conftest import ROOT
from utils.runtime import child_environment

SCRIPT = os.path.join("test_tipc", "test_train_inference_python.sh")
PREPARE = os.path.join("test_tipc", "prepare.sh")
CONFIG = os.path.join("test_tipc", "configs", "train_infer_python.txt")

# The standard layout (PaddleOCR's test_tipc train_infer_python.txt, 51 lines): what the
# standard script reads at each 0-based line, and the key our config puts there.
STANDARD_LAYOUT = {
    0: ("train_params header", "===========================train_params==========================="),
    1: ("model_name", "model_name"), 2: ("python", "python"), 3: ("gpu_list", "gpu_list"),
    4: ("Global.use_gpu", "--device"), 5: ("Global.auto_cast", "--amp"), 6: ("epoch", "--epochs"),
    7: ("save_model_dir", "--output_dir"), 8: ("train_batch_size", "--batch_size"),
    9: ("pretrained_model", "--output_dir"), 10: ("train_model_name", "train_model_name"),
    11: ("train_infer_img_dir", "train_infer_img_dir"), 12: ("train_param_key1", "null"),
    13: ("separator", "##"), 14: ("trainer", "trainer"), 15: ("norm_train", "norm_train"),
    16: ("pact_train", "pact_train"), 17: ("fpgm_train", "fpgm_train"), 18: ("distill_train", "distill_train"),
    19: ("null", "null"), 20: ("null", "null"), 21: ("separator", "##"),
    22: ("eval_params header", "===========================eval_params==========================="),
    23: ("eval", "eval"), 24: ("eval_param_key1", "null"), 25: ("separator", "##"),
    26: ("infer_params header", "===========================infer_params==========================="),
    27: ("save_infer_dir", "--save_dir"), 28: ("export_weight", "--output_dir"), 29: ("norm_export", "norm_export"),
    30: ("quant_export", "quant_export"), 31: ("fpgm_export", "fpgm_export"), 32: ("distill_export", "distill_export"),
    33: ("export1", "export1"), 34: ("export2", "export2"), 35: ("inference_dir", "inference_dir"),
    36: ("infer_model", "infer_model"), 37: ("infer_export", "infer_export"), 38: ("infer_quant", "infer_quant"),
    39: ("inference", "inference"), 40: ("--use_gpu", "--use_gpu"), 41: ("--enable_mkldnn", "--enable_mkldnn"),
    42: ("--cpu_threads", "--cpu_threads"), 43: ("--batch_size", "--batch_size"),
    44: ("--use_tensorrt", "--use_tensorrt"), 45: ("--precision", "--precision"), 46: ("--model_dir", "--model_dir"),
    47: ("--image_dir", "--image"), 48: ("--save_log_path", "null"), 49: ("--benchmark", "--benchmark"),
    50: ("null", "null"),
}


def config_lines(path=CONFIG):
    """The lines as the standard script holds them: newline-split, empty lines dropped."""
    return [line for line in open(os.path.join(ROOT, path)).read().split("\n") if line][:51]


def test_config_keys_are_at_their_standard_lines():
    lines = config_lines()
    assert len(lines) == 51
    for index, (meaning, key) in STANDARD_LAYOUT.items():
        assert lines[index].split(":", 1)[0] == key, f"line {index + 1} ({meaning}): {lines[index]!r}"


def test_config_values_name_our_commands_and_settings():
    value = {i: line.split(":", 1)[1] if ":" in line else "" for i, line in enumerate(config_lines())}
    assert value[3] == "-1" and value[4] == "cpu" and value[5] == "null"  # CPU, no AMP
    assert "lite_train_lite_infer=2" in value[6] and "whole_train_whole_infer=200" in value[6]
    assert value[14] == "norm_train" and value[15].startswith("main.py --mode train")
    assert value[23] == "main.py --mode eval" and value[29] == "export_model.py" and value[39] == "infer.py"
    assert value[40] == "False" and set(value[41].split("|")) == {"True", "False"} and value[49] == "True"


def run(mode, out_dir, config=CONFIG, prepare=True):
    env = child_environment(TIPC_OUTPUT=str(out_dir))
    if prepare:
        prepared = subprocess.run(["bash", PREPARE, config, mode], cwd=ROOT, env=env, capture_output=True, text=True)
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return subprocess.run(["bash", SCRIPT, config, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def verdicts(out_dir):
    return [line for line in (out_dir / "results_python.log").read_text().splitlines() if "Run " in line]


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    """The earlier reproduction's command as a fresh clone runs it: without prepare.sh first."""
    out_dir = tmp_path_factory.mktemp("tipc_lite")
    settings = os.path.join(ROOT, "test_tipc", "data", "rd4ad.yaml")
    if os.path.exists(settings):
        os.remove(settings)
    return run("lite_train_lite_infer", out_dir, prepare=False), out_dir


def test_an_unprepared_mode_is_prepared_first(lite_run):
    proc, _ = lite_run
    assert proc.stdout.startswith("lite_train_lite_infer is not prepared: bash test_tipc/prepare.sh"), proc.stdout[:500]
    assert "cannot read config file" not in proc.stdout + proc.stderr


def test_a_mode_that_cannot_be_prepared_names_prepare_and_runs_nothing(tmp_path):
    env = child_environment(TIPC_OUTPUT=str(tmp_path), TIPC_MVTEC=str(tmp_path / "no_mvtec"))
    proc = subprocess.run(["bash", SCRIPT, CONFIG, "whole_train_whole_infer"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "download MVTec AD" in proc.stdout and "prepare.sh" in proc.stdout.splitlines()[-1]
    assert not (tmp_path / "results_python.log").exists()


def test_lite_train_lite_infer_passes_and_logs_where_tipc_looks(lite_run):
    proc, tmp_path = lite_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = verdicts(tmp_path)
    assert len(lines) == 7 and all("Run successfully with command" in line for line in lines)
    assert [sum(step in line for line in lines) for step in ("--mode train", "--mode eval", "export_model.py",
                                                              "infer.py")] == [1, 1, 1, 4]
    for mkldnn in ("True", "False"):
        for threads in (1, 2):
            log = tmp_path / f"python_infer_cpu_usemkldnn_{mkldnn}_threads_{threads}_precision_fp32_batchsize_1.log"
            assert "inference_time(ms)" in log.read_text()  # AutoLog's line, read by TIPC's analysers
    train_log = (tmp_path / "norm_train_gpus_-1_autocast_null.log").read_text()
    assert "loss" in train_log and "ips" in train_log and "reader_cost" in train_log


def test_a_failed_training_is_reported_and_nothing_after_it_runs(tmp_path):
    config = tmp_path / "broken.txt"
    text = open(os.path.join(ROOT, CONFIG)).read()
    config.write_text(text.replace("--config ./test_tipc/data/rd4ad.yaml", "--config ./test_tipc/data/rd4ad.yaml "
                                   "--cls no_such_class", 1))
    proc = run("lite_train_lite_infer", tmp_path / "logs", str(config))
    assert proc.returncode != 0
    lines = verdicts(tmp_path / "logs")
    assert len(lines) == 1 and "Run failed with command" in lines[0] and "--mode train" in lines[0]


def whole_infer_config(tmp_path, trained):
    """Our config with infer_model (line 37) naming `trained` and the export folder (line 28)
    in tmp_path, as a user points whole_infer at a model of theirs."""
    lines = open(os.path.join(ROOT, CONFIG)).read().split("\n")
    assert lines[27].startswith("--save_dir:") and lines[36].startswith("infer_model:")
    lines[27], lines[36] = f"--save_dir:{tmp_path / 'inference'}", f"infer_model:{trained}"
    config = tmp_path / "whole_infer.txt"
    config.write_text("\n".join(lines))
    return str(config)


def run_whole_infer(tmp_path, trained):
    # MVTec AD cannot be downloaded here: the bundled sample_data has its layout
    env = child_environment(TIPC_OUTPUT=str(tmp_path / "logs"), TIPC_MVTEC=os.path.join(ROOT, "sample_data"))
    config = whole_infer_config(tmp_path, trained)
    prepared = subprocess.run(["bash", PREPARE, config, "whole_infer"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    return subprocess.run(["bash", SCRIPT, config, "whole_infer"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_whole_infer_exports_and_infers_the_given_model(lite_run, tmp_path):
    trained = lite_run[1] / "norm_train_gpus_-1_autocast_null"
    assert (trained / "bottle" / "model.pdparams").is_file()
    proc = run_whole_infer(tmp_path, trained)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = verdicts(tmp_path / "logs")
    assert len(lines) == 5 and all("Run successfully with command" in line for line in lines)
    assert "export_model.py" in lines[0] and all("infer.py" in line for line in lines[1:])
    assert (tmp_path / "inference" / "model.pdiparams").is_file()  # exported where line 28 says


def test_whole_infer_without_a_given_model_fails_clearly(tmp_path):
    proc = run_whole_infer(tmp_path, tmp_path / "no_such_run")
    assert proc.returncode != 0 and "is not a training run" in verdicts(tmp_path / "logs")[0]
    assert not (tmp_path / "inference").exists()


def test_rdpp_config_runs_the_chain_with_rdpp(tmp_path):
    """test_tipc/configs/rdpp_train_infer_python.txt: the same chain with --model rdpp; the
    trained checkpoint and the export are RD++'s (issue 24 §4)."""
    import json

    from engine.checkpoint import load_checkpoint

    config = os.path.join("test_tipc", "configs", "rdpp_train_infer_python.txt")
    proc = run("lite_train_lite_infer", tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = verdicts(tmp_path)
    assert lines and all("Run successfully" in line and " rdpp " in line for line in lines), lines
    run_dir = tmp_path / "norm_train_gpus_-1_autocast_null"
    assert load_checkpoint(str(run_dir / "bottle" / "model.pdparams"))["model"] == "rdpp"
    assert json.loads((run_dir / "deploy.json").read_text())["model"] == "rdpp"
