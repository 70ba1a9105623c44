"""Every file and folder a run writes, named in one place.

    OUTPUT_DIR/
      config.yaml, config_eval.yaml, ...   the settings of each mode's last run
      results.md, results.json, report.html
      CLASS/model.pdparams                 the checkpoint (best.pdparams: --select_best_on_test)
      CLASS/train_state.pdparams           for --resume; CLASS/status.json marks it finished
      CLASS/metrics.json, CLASS/train_log.json
      CLASS/infer/                         --mode infer: pictures, masks/, scores.csv
      report/CLASS/index.html              the class report and its figures
      inference/CLASS/                     export_model.py: the deployable model
      inference/CLASS/infer/               infer.py's default output for that model
      visualdl/CLASS/                      --visualdl logs
      logs/CLASS.log                       tools/train_all.py
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class RunPaths:
    output_dir: str

    def file(self, name: str) -> str:
        return os.path.join(self.output_dir, name)

    def config_yaml(self, mode: str) -> str:
        return self.file("config.yaml" if mode == "train" else f"config_{mode}.yaml")

    def class_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, cls)

    def checkpoint(self, cls: str, best: bool = False) -> str:
        return os.path.join(self.class_dir(cls), "best.pdparams" if best else "model.pdparams")

    def train_state(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "train_state.pdparams")

    def status(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "status.json")

    def metrics(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "metrics.json")

    def train_log(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "train_log.json")

    def infer_dir(self, cls: str) -> str:
        return os.path.join(self.class_dir(cls), "infer")

    def report_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "report", cls)

    def export_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "inference", cls)

    def visualdl_dir(self, cls: str) -> str:
        return os.path.join(self.output_dir, "visualdl", cls)

    def log_dir(self) -> str:
        return os.path.join(self.output_dir, "logs")


def default_infer_dir(model_dir: str) -> str:
    """infer.py's output for an exported model, when --output_dir is not given: inside the
    model's own folder, so two models (or classes) never share one scores.csv."""
    return os.path.join(model_dir, "infer")
