#!/bin/bash
# Prepare data for a TIPC mode.
#   bash test_tipc/prepare.sh test_tipc/configs/train_infer_python.txt lite_train_lite_infer
set -eu
MODE=${2:?mode}
case "$MODE" in
    lite_train_lite_infer)
        # The bundled sample_data (real MVTec AD bottle images + synthetic defects) and a
        # random resnet18 teacher: nothing to download.
        test -d sample_data/bottle/train/good || { echo "sample_data/ is missing"; exit 1; }
        echo "lite_train_lite_infer: using ./sample_data, nothing to download" ;;
    whole_train_whole_infer|whole_infer)
        if [ ! -d mvtec/bottle ]; then
            echo "download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad"
            echo "and unpack it to ./mvtec (mvtec/bottle/train/good, ...)"
            exit 1
        fi
        python -m pip install -r requirements.txt ;;
    *) echo "unknown mode: $MODE"; exit 2 ;;
esac
