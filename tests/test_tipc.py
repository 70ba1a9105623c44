"""The TIPC lite chain (train -> eval -> export -> infer on CPU) passes, and reports failures."""
import os
import subprocess

from conftest import ROOT

SCRIPT = os.path.join("test_tipc", "test_train_inference_python.sh")
CONFIG = os.path.join("test_tipc", "configs", "train_infer_python.txt")


def run_tipc(config, out_dir):
    env = dict(os.environ, TIPC_OUTPUT=str(out_dir))
    return subprocess.run(["bash", SCRIPT, config, "lite_train_lite_infer"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_lite_train_lite_infer_passes(tmp_path):
    proc = run_tipc(CONFIG, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "results_python.log").read_text()
    lines = [l for l in log.splitlines() if "Run " in l]
    # train, eval, export, and infer with oneDNN on/off x 1/2 threads
    assert len(lines) == 7 and all("Run successfully with command" in l for l in lines)
    assert sum("infer.py" in l for l in lines) == 4
    infer_out = tmp_path / "infer_cpu_mkldnn_True_threads_2_fp32"
    assert (infer_out / "benchmark.json").is_file() and (infer_out / "scores.csv").is_file()


def test_a_failing_step_is_reported_and_fails_the_run(tmp_path):
    config = tmp_path / "broken.txt"
    text = open(os.path.join(ROOT, CONFIG)).read()
    config.write_text(text.replace("--cls:bottle", "--cls:no_such_class", 1)
                          .replace("./test_tipc/output/rd4ad", str(tmp_path / "rd4ad")))
    proc = run_tipc(str(config), tmp_path / "logs")
    assert proc.returncode != 0
    log = (tmp_path / "logs" / "results_python.log").read_text()
    assert "Run failed with command" in log and "main.py --mode train" in log
