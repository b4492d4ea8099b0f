# bash completion for cryptlockctl(1)                                  -*- shell-script -*-
# The command list is checked against cryptlockctl's own by tests/unit/test_completions.py.

_cryptlockctl_dm_names()
{
    local f
    for f in /sys/block/dm-*/dm/name; do
        [[ -r $f ]] && printf '%s\n' "$(<"$f")"
    done
}

_cryptlockctl()
{
    local cur prev words cword
    _init_completion || return

    local commands="status devices check suspend lock enable disable reload monitor"
    local options="--json --timeout --help --version"

    if [[ $prev == --timeout ]]; then
        return  # a number of seconds
    fi

    local i command=
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --timeout) ((i++)) ;;
            -*) ;;
            *) command=${words[i]}; break ;;
        esac
    done

    if [[ $cur == -* ]]; then
        if [[ -n $command ]]; then
            COMPREPLY=($(compgen -W "--json --timeout --help" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$options" -- "$cur"))
        fi
    elif [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "$commands" -- "$cur"))
    elif [[ $command == devices ]]; then
        COMPREPLY=($(compgen -W "$(_cryptlockctl_dm_names)" -- "$cur"))
    fi
}

complete -F _cryptlockctl cryptlockctl
