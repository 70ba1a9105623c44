"""The model's choices as plain names, readable without importing Paddle (the settings and
--help are built from them before any work starts). model/arch.py's table and
model/onednn.py hold what each name means; tests/test_settings.py checks they agree."""

ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2")
CONV_BACKENDS = ("auto", "onednn", "paddle")
