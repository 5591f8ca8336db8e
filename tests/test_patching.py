"""`fp8flow patch` on small checkouts of our own shaped like Megatron-LM around the lines the
patches touch (CI cannot reach GitHub; the patches were checked against the real branches, see
patches/README.md)."""

import shutil

import pytest

from megatron_fp8flow.cli import main
from megatron_fp8flow.patching import PatchError, apply, available_versions

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="fp8flow patch uses git apply")

SCRIPT = {
    16: '''"""A training script."""
import os
from model_provider import model_provider

if __name__ == "__main__":
    pretrain(
        datasets_provider,
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,
        store=store,
    )
''',
    19: '''"""A training script."""
import os
from model_provider import model_provider

if __name__ == "__main__":
    args = parse_and_validate_args(
        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,
        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},
    )
''',
}


def _checkout(tmp_path, minor, script=None):
    root = tmp_path / f"Megatron-LM-{minor}"
    (root / "megatron" / "core").mkdir(parents=True)
    (root / "megatron" / "core" / "package_info.py").write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = 1\n")
    (root / "pretrain_gpt.py").write_text(script if script is not None else SCRIPT[minor])
    return root


@pytest.mark.parametrize("minor", [16, 19])
def test_patch_applies_once_and_reports_after(tmp_path, minor, capsys):
    root = _checkout(tmp_path, minor)
    assert [r.status for r in apply(root, dry_run=True)] == ["would apply"]
    assert "fp8flow_setup" not in (root / "pretrain_gpt.py").read_text()  # a dry run changes nothing
    assert main(["patch", str(root)]) == 0
    assert "applied" in capsys.readouterr().out
    text = (root / "pretrain_gpt.py").read_text()
    assert "from megatron_fp8flow.megatron.launch import fp8flow_extra_args, fp8flow_setup" in text
    assert "fp8flow_setup()" in text
    assert "extra_args_provider=fp8flow_extra_args(add_modelopt_args if has_nvidia_modelopt else None)" in text
    assert [r.status for r in apply(root)] == ["already applied"]
    assert (root / "pretrain_gpt.py").read_text() == text


def test_changed_fork_gets_the_lines_to_add(tmp_path, capsys):
    fork = SCRIPT[16].replace("extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None",
                              "extra_args_provider=my_own_args")
    root = _checkout(tmp_path, 16, fork)
    with pytest.raises(PatchError, match="does not apply") as err:
        apply(root)
    assert "fp8flow_setup()" in str(err.value) and "fp8flow_extra_args(" in str(err.value)
    assert main(["patch", str(root)]) == 1
    assert "Add these lines by hand" in capsys.readouterr().err
    assert (root / "pretrain_gpt.py").read_text() == fork  # nothing half-applied


def test_unsupported_version_and_not_a_checkout(tmp_path):
    assert available_versions() == ["core_r0.16.0", "core_r0.19.0"]
    with pytest.raises(PatchError, match="no patch for Megatron-Core 0.17; patches exist for: core_r0.16.0"):
        apply(_checkout(tmp_path, 17, SCRIPT[16]))
    with pytest.raises(PatchError, match="not a Megatron-LM checkout"):
        apply(tmp_path)
