#!/bin/bash
# TIPC basic chain: train -> eval -> export -> inference, each step judged on its own.
#   bash test_tipc/prepare.sh test_tipc/configs/train_infer_python.txt lite_train_lite_infer
#   bash test_tipc/test_train_inference_python.sh test_tipc/configs/train_infer_python.txt lite_train_lite_infer
# The config is read by line number, in the standard TIPC layout (PaddleOCR's 51 lines), so
# Paddle's own test_train_inference_python.sh runs the same chain. Unlike it, this script
# never exports or infers a model that this run did not train (or, in whole_infer, was not
# given), and exits non-zero when any step failed.
set -u
source "$(dirname "$0")/common_func.sh"

FILENAME=${1:?config file}
MODE=${2:?mode}
case "$MODE" in
    lite_train_lite_infer|lite_train_whole_infer|whole_train_whole_infer|whole_infer) ;;
    *) echo "unknown mode: $MODE"; exit 2 ;;
esac

# A fresh clone has not run prepare.sh: prepare the mode now (its data link and settings).
prepared=$(head -n 1 "$(dirname "$0")/data/rd4ad.yaml" 2>/dev/null)
if [[ "$prepared" != "# written by test_tipc/prepare.sh for $MODE" ]]; then
    echo "$MODE is not prepared: bash test_tipc/prepare.sh $FILENAME $MODE"
    bash "$(dirname "$0")/prepare.sh" "$FILENAME" "$MODE" \
        || { echo "error: bash test_tipc/prepare.sh $FILENAME $MODE failed (see above): nothing run"; exit 1; }
fi

IFS=$'\n' read -d '' -ra lines < <(head -n 51 "$FILENAME")
key() { func_parser_key "${lines[$1]}"; }
value() { func_parser_value "${lines[$1]}"; }
for_mode() { func_value_for_mode "$(value "$1")" "$MODE"; }

model_name=$(value 1); python=$(value 2); gpu_list=$(value 3)
use_gpu_key=$(key 4); use_gpu_list=$(value 4)
autocast_key=$(key 5); autocast_list=$(value 5)
epoch_key=$(key 6); epoch_num=$(for_mode 6)
save_model_key=$(key 7)
batch_key=$(key 8); batch_num=$(for_mode 8)
pretrain_key=$(key 9); pretrain_value=$(value 9)
train_model_name=$(value 10)
train_infer_img_dir=$(value 11)
train_param_key1=$(key 12); train_param_value1=$(value 12)
trainer_list=$(value 14); norm_train=$(value 15)
eval_py=$(value 23)
save_infer_key=$(key 27); save_infer_dir=$(value 27)
export_weight_key=$(key 28)
norm_export=$(value 29)
infer_model=$(value 36); infer_export=$(value 37)
inference_py=$(value 39)
infer_gpu_key=$(key 40); infer_gpu_list=$(value 40)
mkldnn_key=$(key 41); mkldnn_list=$(value 41)
threads_key=$(key 42); threads_list=$(value 42)
infer_batch_key=$(key 43); infer_batch_list=$(value 43)
trt_key=$(key 44); trt_list=$(value 44)
precision_key=$(key 45); precision_list=$(value 45)
model_dir_key=$(key 46)
image_key=$(key 47); image_value=$(value 47)
save_log_key=$(key 48); save_log_value=$(value 48)
benchmark_key=$(key 49); benchmark_value=$(value 49)

LOG_PATH=${TIPC_OUTPUT:-./test_tipc/output/$model_name/$MODE}
mkdir -p "$LOG_PATH"
status_log=$LOG_PATH/results_python.log
: > "$status_log"
failures=0

# run_step LOG_FILE COMMAND: run, judge, and show the tail of the log on failure
run_step() {
    local log=$1 command=$2 code
    eval "$command" > "$log" 2>&1
    code=$?
    status_check $code "$command" "$status_log" "$model_name"
    if [[ $code -ne 0 ]]; then
        failures=$((failures + 1))
        tail -n 20 "$log"
    fi
    return $code
}

# infer MODEL_DIR IMAGES: every CPU (or GPU) setting of the config, a log named as TIPC's
infer() {
    local model_dir=$1 images=$2 use_gpu mkldnn threads batch precision trt common
    common="$(func_set_params "$model_dir_key" "$model_dir") $(func_set_params "$image_key" "$images") \
$(func_set_params "$save_log_key" "$save_log_value") $(func_set_params "$benchmark_key" "$benchmark_value")"
    IFS='|'
    for use_gpu in $infer_gpu_list; do
        if [[ "$use_gpu" == "False" || "$use_gpu" == "cpu" ]]; then
            for mkldnn in $mkldnn_list; do for threads in $threads_list; do
            for batch in $infer_batch_list; do for precision in $precision_list; do
                # bf16 and int8 run on CPU only with oneDNN
                [[ "$precision" != "fp32" && "$mkldnn" != "True" ]] && continue
                run_step "$LOG_PATH/python_infer_cpu_usemkldnn_${mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch}.log" \
                    "$python $inference_py $infer_gpu_key=False $(func_set_params "$mkldnn_key" "$mkldnn") \
$(func_set_params "$threads_key" "$threads") $(func_set_params "$infer_batch_key" "$batch") \
$(func_set_params "$precision_key" "$precision") $common"
            done; done; done; done
        elif [[ "$use_gpu" == "True" || "$use_gpu" == "gpu" ]]; then
            for trt in $trt_list; do for batch in $infer_batch_list; do for precision in $precision_list; do
                run_step "$LOG_PATH/python_infer_gpu_usetrt_${trt}_precision_${precision}_batchsize_${batch}.log" \
                    "$python $inference_py $infer_gpu_key=True $(func_set_params "$trt_key" "$trt") \
$(func_set_params "$infer_batch_key" "$batch") $(func_set_params "$precision_key" "$precision") $common"
            done; done; done
        fi
    done
    unset IFS
}

if [[ "$MODE" == "whole_infer" ]]; then
    # a model this run did not train: the one the config names (infer_model), exported fresh
    if [[ ! -d "$infer_model" ]]; then
        status_check 1 "whole_infer: $infer_model (infer_model, line 37) is not a training run" "$status_log" "$model_name"
        exit 1
    fi
    rm -rf "$save_infer_dir"
    run_step "$LOG_PATH/export.log" "$python $infer_export $(func_set_params "$export_weight_key" "$infer_model") \
$(func_set_params "$save_infer_key" "$save_infer_dir")" && infer "$save_infer_dir" "$image_value"
else
    IFS='|' read -ra gpus <<< "$gpu_list"
    IFS='|' read -ra use_gpus <<< "$use_gpu_list"
    IFS='|' read -ra autocasts <<< "$autocast_list"
    for g in "${!gpus[@]}"; do
        gpu=${gpus[$g]}; use_gpu=${use_gpus[$g]:-${use_gpus[0]}}
        for autocast in "${autocasts[@]}"; do
            for trainer in $trainer_list; do
                [[ "$trainer" == "norm_train" && "$norm_train" != "null" ]] || continue
                # a fresh folder per run: never a stale checkpoint from an earlier one
                save_log=$LOG_PATH/${trainer}_gpus_${gpu//,/-}_autocast_${autocast}
                rm -rf "$save_log"
                env=""
                launch="$python"
                if [[ "$gpu" != "-1" ]]; then
                    env="CUDA_VISIBLE_DEVICES=$gpu"
                    [[ "$gpu" == *,* ]] && launch="$python -m paddle.distributed.launch --devices=$gpu"
                fi
                train_args="$(func_set_params "$use_gpu_key" "$use_gpu") $(func_set_params "$save_model_key" "$save_log") \
$(func_set_params "$epoch_key" "$epoch_num") $(func_set_params "$pretrain_key" "$pretrain_value") \
$(func_set_params "$autocast_key" "$autocast") $(func_set_params "$batch_key" "$batch_num") \
$(func_set_params "$train_param_key1" "$train_param_value1")"
                run_step "$LOG_PATH/${trainer}_gpus_${gpu//,/-}_autocast_${autocast}.log" \
                    "$env $launch $norm_train $train_args" || continue  # nothing trained: nothing to judge
                trained="$save_log/$train_model_name"
                if [[ "$eval_py" != "null" ]]; then
                    run_step "$LOG_PATH/eval_${trainer}_gpus_${gpu//,/-}.log" \
                        "$env $python $eval_py $(func_set_params "$pretrain_key" "$trained") $(func_set_params "$use_gpu_key" "$use_gpu")"
                fi
                [[ "$norm_export" == "null" ]] && continue
                run_step "$LOG_PATH/export_${trainer}_gpus_${gpu//,/-}.log" \
                    "$python $norm_export $(func_set_params "$export_weight_key" "$trained") \
$(func_set_params "$save_infer_key" "$save_log")" || continue
                infer "$save_log" "$train_infer_img_dir"
            done
        done
    done
fi

echo "results: $status_log ($failures failed)"
[[ $failures -eq 0 ]]
