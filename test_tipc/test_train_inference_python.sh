#!/bin/bash
# TIPC basic chain: train -> eval -> export -> inference, each step judged on its own.
#   bash test_tipc/test_train_inference_python.sh test_tipc/configs/train_infer_python.txt lite_train_lite_infer
# Modes: lite_train_lite_infer (offline, small, CPU), whole_train_whole_infer, whole_infer
# (the last skips training and infers from the checkpoint the config names).
set -u
source "$(dirname "$0")/common_func.sh"

FILENAME=${1:?config file}
MODE=${2:?mode}
case "$MODE" in
    lite_train_lite_infer|whole_train_whole_infer|whole_infer) ;;
    *) echo "unknown mode: $MODE"; exit 2 ;;
esac

train_section=$(func_section "$FILENAME" train_params)
eval_section=$(func_section "$FILENAME" eval_params)
infer_section=$(func_section "$FILENAME" infer_params)

# value of KEY in a section, for this mode
get() {
    local line
    line=$(grep -m1 -- "^$2:" <<< "$1")
    func_value_for_mode "$(func_parser_value "$line")" "$MODE"
}

# every "--key:value" line of a section as "--key=value" arguments, except SKIP keys
params_of() {
    local section=$1 skip=" ${2:-} " out="" line key value
    while IFS= read -r line; do
        [[ "$line" == --* ]] || continue
        key=$(func_parser_key "$line")
        [[ "$skip" == *" $key "* ]] && continue
        value=$(func_value_for_mode "$(func_parser_value "$line")" "$MODE")
        out+=" $(func_set_params "$key" "$value")"
    done <<< "$section"
    echo "$out"
}

model_name=$(get "$train_section" model_name)
python=$(get "$train_section" python)
gpu_list=$(get "$train_section" gpu_list)
LOG_PATH=${TIPC_OUTPUT:-./test_tipc/output}
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
}

train_params=$(params_of "$train_section")
if [[ "$MODE" != "whole_infer" ]]; then
    run_step "$LOG_PATH/train.log" "$python $(get "$train_section" norm_train) $train_params"
    run_step "$LOG_PATH/eval.log" "$python $(get "$eval_section" eval) $train_params"
fi

checkpoint=$(get "$infer_section" --checkpoint)
save_dir=$(get "$infer_section" --save_dir)
run_step "$LOG_PATH/export.log" \
    "$python $(get "$infer_section" norm_export) --checkpoint=$checkpoint --save_dir=$save_dir"

inference=$(get "$infer_section" inference)
infer_params=$(params_of "$infer_section" \
    "--checkpoint --save_dir --device --enable_mkldnn --cpu_threads --use_tensorrt --precision")
IFS='|' read -ra mkldnn_list <<< "$(get "$infer_section" --enable_mkldnn)"
IFS='|' read -ra threads_list <<< "$(get "$infer_section" --cpu_threads)"
IFS='|' read -ra trt_list <<< "$(get "$infer_section" --use_tensorrt)"
IFS='|' read -ra precision_list <<< "$(get "$infer_section" --precision)"
IFS='|' read -ra device_list <<< "$(get "$infer_section" --device)"

for device in "${device_list[@]}"; do
    if [[ "$device" == "cpu" ]]; then
        for mkldnn in "${mkldnn_list[@]}"; do
            for threads in "${threads_list[@]}"; do
                for precision in "${precision_list[@]}"; do
                    # bf16 and int8 run on CPU only with oneDNN
                    [[ "$precision" != "fp32" && "$mkldnn" != "True" ]] && continue
                    out="$LOG_PATH/infer_cpu_mkldnn_${mkldnn}_threads_${threads}_${precision}"
                    run_step "$out.log" "$python $inference --model_dir=$save_dir --device=cpu \
--enable_mkldnn=$mkldnn --cpu_threads=$threads --use_tensorrt=False --precision=$precision \
$infer_params --output_dir=$out"
                done
            done
        done
    elif [[ "$device" == "gpu" && "$gpu_list" != "-1" ]]; then
        for trt in "${trt_list[@]}"; do
            for precision in "${precision_list[@]}"; do
                out="$LOG_PATH/infer_gpu_trt_${trt}_${precision}"
                run_step "$out.log" "CUDA_VISIBLE_DEVICES=$gpu_list $python $inference \
--model_dir=$save_dir --device=gpu --use_tensorrt=$trt --precision=$precision $infer_params \
--output_dir=$out"
            done
        done
    fi
done

echo "results: $status_log ($failures failed)"
[[ $failures -eq 0 ]]
