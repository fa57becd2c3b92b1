"""The bench's settings: methods, IPCs, nets, repeats, the metrics and the sweep, validated."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from ..checks import flag, require_finite
from ..errors import UserError
from ..evaluate import EvalConfig
from ..finetune import finetune_defaults
from ..references import ScoreConfig
from ..sample import SampleConfig
from ..selection import RULES
from ..train import TrainConfig

log = logging.getLogger(__name__)


METHODS = ("random", "herding", "dit", "minimax", "adaptive")
# Opt-in controls, not in the default grid: "finetune" is the same fine-tuning without memory losses, which
# separates what the memories do from what fine-tuning alone does.
EXTRA_METHODS = ("finetune",)
REAL_METHODS = ("random", "herding")
# the fine-tuned methods and their memory strategy
MEMORY_OF = {"finetune": "none", "minimax": "fifo", "adaptive": "adaptive"}
LABELS = {"random": "Random", "herding": "Herding", "dit": "DiT", "finetune": "Fine-tune (no memory)",
          "minimax": "Minimax", "adaptive": "Adaptive"}


# ----- method variants: METHOD+LEVER[:ARG[:ARG]]... -----------------------------------------------------------
# A lever changes how a fine-tuned (or the plain) model is sampled, so it composes with any generative method.
# Each lever registers here: its parser (the ':'-separated arguments -> a dict of settings, UserError on bad
# ones), its table label and the syntax the error messages show. A new lever (e.g. guidance options) is one entry.
DEFAULT_POOL = 4.0  # the over-generation factor F of +select when none is given (pools of 2-5 x IPC in the field)


def _select_args(args: list[str]) -> dict:
    if not 1 <= len(args) <= 2:
        raise UserError(f"+select takes a rule and optionally a pool factor (select:RULE[:F]), got {':'.join(args)!r}")
    if args[0] not in RULES:
        raise UserError(f"+select: unknown rule {args[0]!r}; allowed: {', '.join(RULES)}")
    try:
        factor = float(args[1]) if len(args) == 2 else DEFAULT_POOL
    except ValueError:
        factor = float("nan")
    if not (math.isfinite(factor) and factor >= 1):
        raise UserError(f"+select: the pool factor F must be a number >= 1, got {args[1]!r}")
    return {"rule": args[0], "pool": factor}


@dataclass(frozen=True)
class Lever:
    parse: Callable[[list[str]], dict]
    label: Callable[[dict], str]
    syntax: str
    doc: str  # what it does, for --help (see lever_help)


# --method is a comma-separated list, so the bench spells an interval A-B where sample takes A,B
INTERVAL_HINT = "write the interval as A-B in --method (e.g. dit+cfgint:200-800), whose entries are comma-separated"


def _guidance_lever(name: str, syntax: str, label: Callable[[dict], str], doc: str) -> Lever:
    """A sampling-guidance lever: its settings are SampleConfig overrides (guidance.variant_overrides)."""
    from ..guidance import variant_overrides

    def parse(args: list[str]) -> dict:
        if name == "cfgint" and len(args) == 1 and "-" not in args[0]:
            raise UserError(f"+cfgint takes an interval A-B, got {args[0]!r}: {INTERVAL_HINT}")
        return variant_overrides(":".join([name, *(a.replace("-", ",") if name == "cfgint" else a for a in args)]))

    return Lever(parse, label, syntax, doc)


LEVERS: dict[str, Lever] = {
    "select": Lever(_select_args, lambda a: f"select {a['rule']} (pool {a['pool']:g}x)", "select:RULE[:F]",
                    f"keep IPC of ceil(F x IPC) candidates per class by RULE, one of {', '.join(RULES)}; F default "
                    f"{DEFAULT_POOL:g}; one pool per method and F serves every rule"),
    "modes": _guidance_lever("modes", "modes:S[:F[:K]]", lambda a: "modes {:g}".format(a["mode_guidance"]) + (
        " until {:g}".format(a["mode_stop"]) if "mode_stop" in a else "") + (f" k={a['modes']}" if "modes" in a else ""),
        "mode guidance of strength S, 0 to 1, for the first fraction F of the trajectory, 0.5 unless given, "
        "towards K modes per class, IPC unless given"),
    "cfgint": _guidance_lever("cfgint", "cfgint:A-B", lambda a: "CFG in [{})".format(a["cfg_interval"]),
                              "classifier-free guidance only at timesteps A <= t < B of 0 to 1000"),
    "cfgsched": _guidance_lever("cfgsched", "cfgsched:linear|cosine", lambda a: f"CFG {a['cfg_schedule']}",
                                "the guidance scale ramps from 1 at pure noise up to the scale at the clean end"),
    "cfg": _guidance_lever("cfg", "cfg:W", lambda a: "CFG {:g}".format(a["cfg_scale"]), "guidance scale W"),
}


def lever_help() -> str:
    """Every lever of LEVERS as "+SYNTAX (what it does)", for --method's help."""
    return "; ".join(f"+{lever.syntax} ({lever.doc})" for lever in LEVERS.values())
# Levers that change how each image is sampled (the others, select, choose among sampled images).
GUIDANCE_LEVERS = ("modes", "cfgint", "cfgsched", "cfg")


@dataclass(frozen=True)
class MethodVariant:
    """A parsed --method entry: the base method and its levers in the order given, {lever: settings}."""

    name: str
    base: str
    levers: dict

    def label(self) -> str:
        return " + ".join([LABELS[self.base]] + [LEVERS[n].label(a) for n, a in self.levers.items()])

    def slug(self) -> str:
        """The name as a file name (':' is awkward in paths on some systems)."""
        return self.name.replace(":", "-")

    def sampled(self) -> str:
        """The name of what is sampled: the base method with its guidance levers, without +select."""
        return "+".join([self.base] + [part for part in self.name.split("+")[1:]
                                       if part.split(":")[0] in GUIDANCE_LEVERS])

    def sample_overrides(self) -> dict:
        """SampleConfig field overrides of the guidance levers, e.g. {"cfg_interval": "200,800"}."""
        return {k: v for name, settings in self.levers.items() if name in GUIDANCE_LEVERS for k, v in settings.items()}


def parse_method(text: str) -> MethodVariant:
    """'dit', 'adaptive+select:confident', 'dit+select:kcenter:4' -> MethodVariant; UserError naming --method
    and what is allowed otherwise. Levers apply to generated sets only, each at most once."""
    base, *parts = str(text).split("+")
    allowed = METHODS + EXTRA_METHODS
    if base not in allowed:
        raise UserError(f"unknown method {base!r} in --method; allowed: {', '.join(allowed)} (comma-separated), each "
                        f"optionally with levers {', '.join('+' + lv.syntax for lv in LEVERS.values())}")
    if parts and base in REAL_METHODS:
        raise UserError(f"--method {text}: levers change how a model is sampled; {base} selects real images (use "
                        f"them with dit, {', '.join(MEMORY_OF)})")
    levers: dict = {}
    for part in parts:
        name, *args = part.split(":")
        if name not in LEVERS:
            raise UserError(f"--method {text}: unknown lever {name!r}; allowed: "
                            f"{', '.join('+' + lv.syntax for lv in LEVERS.values())}")
        if name in levers:
            raise UserError(f"--method {text}: the lever +{name} is given twice")
        try:
            levers[name] = LEVERS[name].parse(args)
        except UserError as e:
            raise UserError(f"--method {text}: {e}") from None
    return MethodVariant(str(text), base, levers)


def method_label(text: str) -> str:
    """The column title of a --method entry in tables and plots (a name it does not know: the name itself)."""
    try:
        return parse_method(text).label()
    except UserError:
        return str(text)


SWEEP_PARAMETERS = ("lambda_real", "lambda_gen", "memory")
TIE_RULE = ("Bold: the best mean of the row and every method whose mean lies within one standard deviation "
            "(over repeats) of it; differences smaller than that spread are ties at this number of repeats.")


@dataclass
class BenchConfig:
    methods: str = ",".join(METHODS)
    ipcs: str = "1,10,50"
    nets: str = "convnet3"
    repeats: int = 3
    test: str | None = None  # real test images: None = the embedded dataset's test split; else a folder
    # diversity / coverage, in the feature space of a classifier trained on the real train split
    metrics: bool = True
    feature_net: str = "convnet3"
    feature_epochs: int = 5
    coverage_k: int = 5
    # sensitivity sweep (paper Figure 4): adaptive memory, one IPC, the first net; '' skips a parameter
    sweep: bool = False
    sweep_ipc: int = 10
    sweep_lambda_real: str = "0,0.001,0.002,0.004,0.008"
    sweep_lambda_gen: str = "0,0.004,0.008,0.016,0.032"
    sweep_memory: str = "16,32,64,128"  # N_R = N_G
    finetune: TrainConfig = field(default_factory=finetune_defaults)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # epochs None: the protocol's table (METHOD.md section 7)
    # DD-Ranking's HLR / IOR / LRS of every cell, on by default (references trained once, cached); no ARS here
    scores: ScoreConfig = field(default_factory=lambda: ScoreConfig(scores=True))

    def method_list(self) -> list[str]:
        """The --method entries: base methods and variants METHOD+LEVER[:ARGS] (see parse_method), each checked."""
        comma = re.search(r"cfgint:([\d.]+),([\d.]+)(?=$|[,+])", str(self.methods).replace(" ", ""))
        if comma:  # sample's A,B form: the list split it into two entries
            raise UserError(f"--method: +cfgint:{comma[1]},{comma[2]} splits the method list at its comma; write "
                            f"+cfgint:{comma[1]}-{comma[2]} ({INTERVAL_HINT})")
        names = _split(self.methods, "method", str)
        if not names:
            raise UserError(f"--method is empty; allowed: {', '.join(METHODS + EXTRA_METHODS)}")
        for name in names:
            parse_method(name)
        return list(dict.fromkeys(names))

    def base_methods(self) -> list[str]:
        """The distinct base methods behind --method (what is fine-tuned or selected from real data)."""
        return list(dict.fromkeys(parse_method(m).base for m in self.method_list()))

    def ipc_list(self) -> list[int]:
        ipcs = _split(self.ipcs, "ipc", int)
        if not ipcs or min(ipcs) < 1:
            raise UserError(f"--ipc must be positive integers such as 1,10,50; got {self.ipcs!r}")
        return sorted(set(ipcs))

    def net_list(self) -> list[str]:
        nets = list(dict.fromkeys(_split(self.nets, "eval-net", str)))
        if not nets:
            raise UserError("--eval-net is empty; give e.g. convnet3 or convnet6,resnetap10,resnet18")
        return nets

    def sweep_points(self) -> list[tuple[str, float | int]]:
        """(parameter, value) for every sweep point, parameter by parameter."""
        points: list[tuple[str, float | int]] = []
        for name in SWEEP_PARAMETERS:
            values = _split(getattr(self, f"sweep_{name}"), f"sweep-{name.replace('_', '-')}",
                            int if name == "memory" else float)
            if name != "memory":
                for v in values:
                    require_finite(flag(f"sweep_{name}"), v, low=0)
            if any(v < (1 if name == "memory" else 0) for v in values):
                raise UserError(f"--sweep-{name.replace('_', '-')} values must be "
                                f"{'>= 1' if name == 'memory' else '>= 0'}, got {values}")
            points += [(name, v) for v in dict.fromkeys(values)]
        if not points:
            raise UserError("the sweep has no points: give at least one of --sweep-lambda-real, "
                            "--sweep-lambda-gen, --sweep-memory")
        return points

    def validate(self) -> None:
        self.method_list(), self.ipc_list(), self.net_list()
        if self.repeats < 1:
            raise UserError(f"--eval-repeats must be at least 1, got {self.repeats}")
        if self.feature_epochs < 1:
            raise UserError(f"--feature-epochs must be at least 1, got {self.feature_epochs}")
        if self.coverage_k < 1:
            raise UserError(f"--coverage-k must be at least 1, got {self.coverage_k}")
        if self.sweep:
            if self.sweep_ipc < 1:
                raise UserError(f"--sweep-ipc must be at least 1, got {self.sweep_ipc}")
            self.sweep_points()
        self.finetune.validate()
        self.sample.validate(prefix="sample-")
        self.eval.validate(prefix="eval-")
        self.scores.validate()
        if self.scores.ars and self.sweep:
            raise UserError("--ars scores the method grid; the sweep reports top-1 only: drop --ars or --sweep")


def _split(text: str, name: str, kind: type) -> list:
    """The comma-separated list ``text`` of option --``name`` as ``kind`` values; a value given twice is refused
    (it would run, or count, twice)."""
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"--{name} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise UserError(f"--{name} lists {', '.join(twice)} more than once")
    return values


# ----- the table, the plots ---------------------------------------------------------------------------------
