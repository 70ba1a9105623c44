#!/bin/bash
# Helpers for the TIPC scripts: parse "key:value" lines and report each step.

# key of "key:value"
func_parser_key() {
    echo "${1%%:*}"
}

# value of "key:value" (everything after the first colon)
func_parser_value() {
    echo "${1#*:}"
}

# "lite_train_lite_infer=2|whole_train_whole_infer=200" -> the value for mode $2;
# a value without "mode=" parts is returned as it is.
func_value_for_mode() {
    local value=$1 mode=$2 part
    if [[ "$value" != *"="* ]]; then
        echo "$value"
        return
    fi
    IFS='|' read -ra parts <<< "$value"
    for part in "${parts[@]}"; do
        if [[ "${part%%=*}" == "$mode" ]]; then
            echo "${part#*=}"
            return
        fi
    done
    echo "null"
}

# "--key=value", or nothing when the value is null or empty
func_set_params() {
    local key=$1 value=$2
    if [[ -z "$key" || "$key" == "null" || -z "$value" || "$value" == "null" ]]; then
        echo ""
    else
        echo "${key}=${value}"
    fi
}

# the lines of one section (between "===...NAME..." and the next "===" header)
func_section() {
    awk -v name="$2" '/^=+/{inside = index($0, name) > 0; next} inside' "$1"
}

# status_check EXIT_CODE COMMAND LOG MODEL: print and log TIPC's verdict line
status_check() {
    local code=$1 command=$2 log=$3 model=$4
    if [[ $code -eq 0 ]]; then
        echo -e "\033[33m Run successfully with command - ${model} - ${command}!  \033[0m" | tee -a "$log"
    else
        echo -e "\033[33m Run failed with command - ${model} - ${command}!  \033[0m" | tee -a "$log"
    fi
}
