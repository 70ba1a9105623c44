#!/bin/bash
# Prepare the data and settings of a TIPC mode, as Paddle's TIPC tooling expects:
#   bash test_tipc/prepare.sh test_tipc/configs/train_infer_python.txt MODE
# writes test_tipc/data/mvtec (a link to the mode's data) and test_tipc/data/rd4ad.yaml
# (the mode's model settings), which the config's fixed commands read.
set -eu
MODE=${2:?mode}
cd "$(dirname "$0")/.."
mkdir -p test_tipc/data
case "$MODE" in
    lite_train_lite_infer|lite_train_whole_infer)
        # The bundled sample_data (real MVTec AD bottle images + synthetic defects) and a
        # random resnet18 teacher: nothing to download.
        test -d sample_data/bottle/train/good || { echo "sample_data/ is missing"; exit 1; }
        data=../../sample_data
        settings="arch: resnet18\nimage_size: 64\nbatch_size: 3\nteacher_weights: none\nlog_interval: 1" ;;
    whole_train_whole_infer|whole_infer)
        # MVTec AD in ./mvtec, or where TIPC_MVTEC says
        mvtec=${TIPC_MVTEC:-./mvtec}
        if [ ! -d "$mvtec/bottle" ]; then
            echo "download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad"
            echo "and unpack it to ./mvtec (mvtec/bottle/train/good, ...), or set TIPC_MVTEC to its folder"
            exit 1
        fi
        case "$mvtec" in /*) data=$mvtec ;; *) data=../../$mvtec ;; esac
        settings="arch: wide_resnet50_2\nimage_size: 256\nbatch_size: 16\nteacher_weights: imagenet" ;;
    *) echo "unknown mode: $MODE"; exit 2 ;;
esac
ln -sfn "$data" test_tipc/data/mvtec
printf "# written by test_tipc/prepare.sh for $MODE\ndata_dir: ./test_tipc/data/mvtec\ncls: bottle\neval_interval: 0\n$settings\n" \
    > test_tipc/data/rd4ad.yaml
echo "$MODE: test_tipc/data/mvtec -> $data; settings in test_tipc/data/rd4ad.yaml"
