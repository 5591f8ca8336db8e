"""Print the command-line arguments of the installed Megatron-LM ``pretrain_gpt`` (its
``megatron.training`` parser) as recipe keys: one snake_case name per line, sorted.

Recipes are validated against these lists (megatron_fp8flow/recipes/megatron_args/) on machines
without ``megatron.training``. Regenerate one after a Megatron-LM release, e.g.:
    PYTHONPATH=/path/to/Megatron-LM python scripts/megatron_arg_names.py > \
        megatron_fp8flow/recipes/megatron_args/core_r0.19.txt
"""
import argparse
import sys
import typing

if not hasattr(typing, "override"):  # megatron.training >= 0.19 imports it; Python < 3.12 lacks it
    typing.override = lambda f: f


class _Captured(Exception):
    pass


def main() -> int:
    parsers = []
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        raise _Captured

    argparse.ArgumentParser.parse_known_args = capture
    try:
        from megatron.training.arguments import parse_args

        sys.argv = ["pretrain_gpt.py"]
        parse_args(ignore_unknown_args=True)
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_known_args = original
    if not parsers:
        print("megatron.training's parse_args did not build a parser", file=sys.stderr)
        return 1
    names = {opt[2:].replace("-", "_") for action in parsers[0]._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"}
    print("\n".join(sorted(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
