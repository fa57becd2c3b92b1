"""The help text a user reads: every option described, one default stated once, no pointer to documents that
do not ship with the package, and one spelling per option across commands."""

import argparse
import re

import pytest

from memdistill.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options(p: argparse.ArgumentParser):
    return [a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def help_problems(command: str) -> list[str]:
    """Every way the help of ``command`` falls short, one line each."""
    p = subcommands()[command]
    problems = []
    for action in options(p):
        name, text = action.option_strings[-1], action.help or ""
        if text == argparse.SUPPRESS:
            continue  # a hidden alias of a documented option
        if not re.sub(r"\(default:[^)]*\)", "", text).strip():
            problems.append(f"{name} is not described: {text!r}")
        if len(re.findall(r"\(default", text)) > 1:
            problems.append(f"{name} states its default twice: {text!r}")
        if re.search(r"\b\w+\.md\b", text):
            problems.append(f"{name} points to a document that does not ship: {text!r}")
        if re.search(r"\(default: [Nn]one\)", text) and "none" not in text.split("(default:")[0]:
            problems.append(f"{name} does not say what its default means: {text!r}")
    for text in (p.description or "", p.epilog or ""):
        if re.search(r"\b\w+\.md\b", text):
            problems.append(f"its description points to a document that does not ship: {text!r}")
    return problems


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_is_described_with_one_default(command):
    assert help_problems(command) == []


def test_one_spelling_per_option_across_commands():
    """An option of a stage is spelled the same in every command that has it; in run it may carry its stage's
    prefix (--sample-*, --eval-*), which the run help explains."""
    spellings: dict[str, set[str]] = {}
    for command, p in subcommands().items():
        for action in options(p):
            if action.help == argparse.SUPPRESS:
                continue
            for flag in action.option_strings:
                spellings.setdefault(action.dest, set()).add(flag)
    # One destination, one flag (short forms aside): e.g. no --repeats in one command and --eval-repeats for
    # the same setting in another without the run prefix rule.
    for dest, flags in spellings.items():
        long_flags = {re.sub(r"^--(eval|sample)-", "--", f) for f in flags
                      if f.startswith("--") and not f.startswith("--no-")}
        assert len(long_flags) <= 1, f"{dest} is spelled {sorted(long_flags)}"
    run = subcommands()["run"]
    assert "--sample-" in run.description and "--eval-" in run.description


def test_stage_options_in_run_and_bench_carry_the_stage_prefix():
    """In run and bench an evaluation option is --eval-<name> and a sampling option --sample-<name>, where
    <name> is its spelling in evaluate / sample; a list-valued option keeps the singular name (--ipc 1,10)."""
    cmds = subcommands()
    flags = {c: {f for a in options(p) if a.help != argparse.SUPPRESS for f in a.option_strings}
             for c, p in cmds.items()}
    training = flags["finetune"] | flags["pretrain"]
    # The DD-Ranking score options say how a report scores its sets, not how a stage trains: one spelling in
    # evaluate, run and bench.
    from memdistill.references import ScoreConfig

    training |= {f"--{no}{name.replace('_', '-')}" for name in ScoreConfig.__dataclass_fields__ for no in ("", "no-")}
    for command in ("run", "bench"):
        for flag in flags[command]:
            for stage in ("evaluate", "sample"):
                assert flag not in flags[stage] or flag in training or flag in ("--out", "--overwrite", "--test",
                                                                                 "--ipc"), \
                    f"{command} {flag} is a {stage} option: spell it --{'eval' if stage == 'evaluate' else 'sample'}-{flag[2:]}"
            every_other = set().union(*(flags[c] for c in cmds if c != command))
            assert not (flag.endswith("s") and flag[:-1] in every_other), f"{command} {flag}: use {flag[:-1]}"


def test_a_shared_help_text_states_each_command_s_own_default():
    # run evaluates for 100 epochs under bf16; the shared texts state evaluate's defaults (the protocol's
    # epochs, auto precision), which are not run's.
    helps = {a.option_strings[-1]: a.help for a in options(subcommands()["run"])}
    assert helps["--eval-epochs"].endswith("(default: 100)")
    assert helps["--eval-precision"].endswith("(default: fast)")
    evaluate = {a.option_strings[-1]: a.help for a in options(subcommands()["evaluate"])}
    assert "the protocol's by IPC" in evaluate["--epochs"]
    for command in subcommands():  # and every numeric default is what the help states, where it states one
        for action in options(subcommands()[command]):
            stated = re.search(r"\(default: ([^()]*)\)$", action.help or "")
            if stated and isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
                first = stated.group(1).split()[0].rstrip(",;")
                assert float(first) == action.default, (command, action.option_strings, stated.group(0))
