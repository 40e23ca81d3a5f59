"""`neuron <command>`: config, help, logging, confirmations and exit codes live here."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable

from loguru import logger

from neuron import config as cfg, logs, preflight
from neuron.chain.base import ChainError


@dataclass(frozen=True)
class Command:
    run: Callable[[list[str], str | None], int]
    config: type  # the dataclass its flags come from
    summary: str
    yaml: str | None = None  # name of its shipped YAML defaults
    positional: str = ""  # e.g. "create|list"


def _usage() -> str:
    lines = ["usage: neuron <command> [options]     neuron help <command>     neuron --version", "", "commands:"]
    for name, c in COMMANDS.items():
        lines.append(f"  {(name + ' ' + c.positional).strip():<20} {c.summary}")
    lines += ["", "Every option is a dotted flag (--axon.port 8092, --axon.port=8092, --logging.debug); "
              "`neuron <command> --help` lists them all, with defaults."]
    return "\n".join(lines) + "\n"


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("neuron")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def _load(cls, command: str, argv: list[str], yaml_path: str | None):
    """Defaults, then the shipped YAML, then --config PATH laid over it (it must exist; it may set only a few
    keys), then flags; logging set up."""
    layers = (yaml_path,) if yaml_path is not None else ()
    c = cfg.load(cls, cfg.default_yaml(command), cfg.parse_dotted(argv), layers=layers)
    logs.setup(c.logging, command)  # the log file is <logging_dir>/<command>.log
    return c


def _positional(argv: list[str], choices: tuple[str, ...], command: str) -> tuple[str, list[str]]:
    if not argv or argv[0].startswith("--"):
        raise cfg.ConfigError(f"neuron {command} needs one of: {', '.join(choices)} (see neuron {command} --help)")
    if argv[0] not in choices:
        close = difflib.get_close_matches(argv[0], choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise cfg.ConfigError(f"neuron {command} {argv[0]}: unknown action{hint} (expected {', '.join(choices)})")
    return argv[0], argv[1:]


def _chain(sub: cfg.SubtensorConfig, create: bool = False):
    """The chain the flags name; a local chain file must exist unless `create` (register's first step)."""
    if sub.network == "none" and not sub.chain_endpoint:
        return None
    from neuron.chain import open_chain

    if sub.chain_endpoint:
        if not sub.chain_endpoint.startswith(("ws://", "wss://")):
            raise cfg.ConfigError(f"--subtensor.chain_endpoint {sub.chain_endpoint}: expected ws:// or wss://")
        return open_chain(sub.chain_endpoint)
    if sub.network == "local":
        if not sub.chain_path:
            raise cfg.ConfigError("--subtensor.network local needs --subtensor.chain_path (the local chain's SQLite file)")
        from pathlib import Path

        if create and not Path(sub.chain_path).exists():
            logger.info(f"creating a new local chain at {sub.chain_path}")
        return open_chain("local", sub.chain_path, create=create)
    return open_chain(sub.network)


def _network(sub: cfg.SubtensorConfig) -> str:
    return sub.chain_endpoint or sub.network


def confirm(action: str, yes: bool) -> None:
    """Paid or irreversible chain actions: print what happens and what it costs, then ask (or --yes)."""
    print(action, file=sys.stderr)
    if yes:
        return
    if not sys.stdin.isatty():
        raise cfg.ConfigError("not confirmed: no terminal to ask on; pass --yes to go ahead")
    if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
        raise cfg.ConfigError("cancelled; nothing was submitted")


def cmd_miner(argv: list[str], yaml_path: str | None) -> int:
    from neuron.miner import run_miner
    from neuron.wallets import open_wallet

    c = preflight.miner(_load(cfg.MinerConfig, "miner", argv, yaml_path))  # before the model loads
    chain = _chain(c.subtensor)
    wallet = open_wallet(c.wallet) if (chain is not None or c.auth.required) else None
    return asyncio.run(run_miner(c, chain, wallet))


def cmd_validator(argv: list[str], yaml_path: str | None) -> int:
    from neuron.validator.loop import run_validator
    from neuron.wallets import open_wallet

    c = _load(cfg.ValidatorConfig, "validator", argv, yaml_path)
    preflight.validator(c)  # before the model loads
    chain = _chain(c.subtensor)
    wallet = open_wallet(c.wallet)
    metrics = server = None
    if c.metrics.port:
        from neuron import metrics as m
        from neuron.miner import check_port_free

        check_port_free(c.metrics.ip, c.metrics.port, "--metrics.port")
        metrics = m.ValidatorMetrics()
        server = m.serve(metrics.registry, c.metrics.ip, c.metrics.port)
        logger.info(f"metrics at http://{c.metrics.ip}:{server.server_port}/metrics")
    try:
        queried = asyncio.run(run_validator(c, chain, wallet, metrics=metrics))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    if c.rounds and not queried:
        logger.error(f"{c.rounds} rounds and no miner could be queried: no uid on netuid {c.subtensor.netuid} "
                     "serves an axon (start a miner, then check with: neuron metagraph)")
        return 1
    return 0


def cmd_wallet(argv: list[str], yaml_path: str | None) -> int:
    from neuron import wallets

    action, argv = _positional(argv, ("create", "list", "regen", "password-env"), "wallet")
    c = _load(cfg.WalletCommandConfig, "wallet", argv, yaml_path)
    if action == "password-env":
        line = wallets.password_env_line(c.wallet)
        print(line)
        print(f"the SDK, btcli and neuron decode this {line.split('=')[0]}; put the line in the service's "
              "environment file (mode 600), e.g. /etc/neuron/validator.env", file=sys.stderr)
        return 0
    if action == "regen":
        return _wallet_regen(c)
    if action == "list":
        found = wallets.list_wallets(c.wallet.path)
        if not found:
            print(f"no wallets in {c.wallet.path}; create one with: neuron wallet create --wallet.name NAME")
        for w in found:
            state = {True: "encrypted", False: "NOT ENCRYPTED", None: "public key only"}[w.encrypted]
            print(f"{w.name:<20} coldkey {w.coldkey or '(missing)'}  ({state})")
            for name, address in w.hotkeys:
                print(f"  hotkey {name:<13} {address}")
        return 0
    from pathlib import Path

    has_coldkey = (Path(c.wallet.path).expanduser() / c.wallet.name / "coldkeypub.txt").exists()
    if has_coldkey:  # only a new hotkey: the coldkey is neither read nor changed
        password = None
    elif c.no_password:
        logger.warning("--no_password: the coldkey is stored unencrypted; anyone who reads the file can spend "
                       "its TAO (development only)")
        password = None
    else:
        password = wallets.new_password(c.wallet)

    def show(kind: str, words: str) -> None:
        print(f"\n{kind} mnemonic (shown once; write it down and keep it offline; it restores the key):\n"
              f"    {words}\n")

    wallet, created = wallets.create_wallet(c.wallet, password, show)
    w = c.wallet
    print(f"created {' and '.join(created)} for {w.name}/{w.hotkey} in {w.path}")
    print(f"coldkey {wallet.coldkeypub.ss58_address}")
    print(f"hotkey  {wallet.hotkey.ss58_address}")
    if "coldkey" in created and password is not None:
        print(f"the coldkey is encrypted; for unattended use (neuron stake, btcli, the SDK) put its password in "
              f"${wallets.coldkey_password_env(w)}, in the SDK's encoded form, written by: "
              f"{wallets.password_env_command(w)}")
    return 0


def _wallet_regen(c: cfg.WalletCommandConfig) -> int:
    """Restore a key from its mnemonic with the SDK (btcli's `wallet regen-coldkey` does the same)."""
    from neuron import wallets

    if c.key not in ("coldkey", "hotkey"):
        raise cfg.ConfigError(f"--key {c.key}: expected coldkey or hotkey")
    mnemonic = wallets.read_secret(f"mnemonic of the {c.key} (12 or 24 words): ")
    password = None
    if c.key == "coldkey" and not c.no_password:
        password = wallets.new_password(c.wallet)
    elif c.key == "coldkey":
        logger.warning("--no_password: the coldkey is stored unencrypted (development only)")
    wallet = wallets.regenerate(c.wallet, c.key, mnemonic, password)
    w = c.wallet
    if c.key == "coldkey":
        print(f"restored the coldkey of {w.name} in {w.path}: {wallet.coldkeypub.ss58_address}"
              f"{' (encrypted)' if password is not None else ' (NOT ENCRYPTED)'}")
    else:
        print(f"restored hotkey {w.name}/{w.hotkey} in {w.path}: {wallet.hotkey.ss58_address}")
    return 0


def cmd_register(argv: list[str], yaml_path: str | None) -> int:
    from neuron.wallets import open_wallet

    c = _load(cfg.RegisterConfig, "register", argv, yaml_path)
    sub, netuid = c.subtensor, c.subtensor.netuid
    wallet = open_wallet(c.wallet)
    chain = _chain(sub, create=True)
    if chain is None:
        raise cfg.ConfigError("register needs a chain: set --subtensor.network (finney, test, local, or an endpoint)")
    local = sub.network == "local" and not sub.chain_endpoint
    # A local chain starts empty; its subnets are created on first use, as a new user would expect.
    if local and chain.create_subnet(netuid):
        s = chain.subnet(netuid)
        logger.info(f"created subnet {netuid} on the local chain {sub.chain_path} with default settings "
                    f"(a validator permit needs stake >= {s.min_validator_stake:g}: neuron stake add)")
    hotkey = wallet.hotkey.ss58_address
    uid = chain.uid_of(netuid, hotkey)
    if uid is not None:
        print(f"hotkey {hotkey} is already registered on netuid {netuid} as uid {uid}; nothing to do")
        return 0
    if not local:
        cost = chain.registration_cost(netuid)
        confirm(f"registering hotkey {hotkey} on subnet {netuid} of {_network(sub)} burns {cost:.9f} TAO "
                f"(plus a transaction fee) from coldkey {wallet.coldkeypub.ss58_address}; it is not refunded",
                c.yes)
    uid, new = chain.register(netuid, wallet)
    if new:
        print(f"registered hotkey {hotkey} on netuid {netuid} as uid {uid}")
    else:
        print(f"hotkey {hotkey} is already registered on netuid {netuid} as uid {uid}; nothing to do")
    return 0


def cmd_stake(argv: list[str], yaml_path: str | None) -> int:
    from neuron.wallets import open_wallet

    action, argv = _positional(argv, ("add", "remove"), "stake")
    c = _load(cfg.StakeConfig, "stake", argv, yaml_path)
    sub, netuid = c.subtensor, c.subtensor.netuid
    if not c.amount > 0:
        raise cfg.ConfigError(f"neuron stake {action} needs --amount TAO (a positive number)")
    wallet = open_wallet(c.wallet)
    chain = _chain(sub)
    if chain is None:
        raise cfg.ConfigError("stake needs a chain: set --subtensor.network (finney, test, local, or an endpoint)")
    hotkey = c.hotkey_ss58 or wallet.hotkey.ss58_address
    local = sub.network == "local" and not sub.chain_endpoint
    if not local:
        verb = (f"staking {c.amount:g} TAO from coldkey {wallet.coldkeypub.ss58_address} onto" if action == "add"
                else f"unstaking {c.amount:g} (alpha) back to coldkey {wallet.coldkeypub.ss58_address} from")
        confirm(f"{verb} hotkey {hotkey} on subnet {netuid} of {_network(sub)}: the TAO/alpha swap moves the pool "
                "price (up to 5% slippage is accepted) and costs a transaction fee", c.yes)
    if action == "add":
        chain.stake(netuid, wallet, hotkey, c.amount)
    else:
        chain.unstake(netuid, wallet, hotkey, c.amount)
    me = chain.metagraph(netuid).by_hotkey(hotkey)
    if me is None:
        print(f"{'staked' if action == 'add' else 'unstaked'} {c.amount:g} on {hotkey} (not registered on netuid {netuid})")
        return 0
    print(f"uid {me.uid} ({hotkey}) on netuid {netuid} now has stake {me.stake:g}; "
          f"validator permit: {'yes' if me.validator_permit else 'no'}")
    if not me.validator_permit and local:
        s = chain.subnet(netuid)
        print(f"a validator permit needs stake >= {s.min_validator_stake:g} and a place in the top "
              f"{s.max_validators} by stake", file=sys.stderr)
    return 0


def cmd_metagraph(argv: list[str], yaml_path: str | None) -> int:
    c = _load(cfg.MetagraphConfig, "metagraph", argv, yaml_path)
    chain = _chain(c.subtensor)
    if chain is None:
        raise cfg.ConfigError("metagraph needs a chain: set --subtensor.network (finney, test, local, or an endpoint)")
    mg = chain.metagraph(c.subtensor.netuid)
    rows = [dict(uid=n.uid, hotkey=n.hotkey, coldkey=n.coldkey, stake=n.stake, permit=n.validator_permit,
                 axon=str(n.axon) if n.axon else "", incentive=n.incentive, last_update=n.last_update)
            for n in mg.neurons]
    if c.json:
        print(json.dumps({"netuid": mg.netuid, "block": mg.block, "neurons": rows}, indent=2))
        return 0
    print(f"netuid {mg.netuid} at block {mg.block}: {len(rows)} neurons")
    print(f"{'uid':>4}  {'hotkey':<48}  {'stake':>10}  {'permit':>6}  {'axon':<21}  {'incentive':>9}  {'updated':>7}")
    for r in rows:
        print(f"{r['uid']:>4}  {r['hotkey']:<48}  {r['stake']:>10.3f}  {'yes' if r['permit'] else 'no':>6}  "
              f"{r['axon'] or '-':<21}  {r['incentive']:>9.4f}  {r['last_update']:>7}")
    return 0


def cmd_query(argv: list[str], yaml_path: str | None) -> int:
    from neuron.dendrite import Dendrite, Target
    from neuron.pb.neuron.v1 import axon_pb2 as pb
    from neuron.protocol import FINISH_OF
    from neuron.wallets import open_wallet

    c = _load(cfg.QueryConfig, "query", argv, yaml_path)
    if not c.axon or not c.prompt:
        raise cfg.ConfigError("neuron query needs --axon HOST:PORT and --prompt TEXT")
    signed = any(a.startswith("--wallet.") for a in argv)
    keypair = open_wallet(c.wallet).hotkey if signed else None

    async def ask():
        d = Dendrite(keypair)
        try:
            target = Target(c.axon)
            if keypair is not None:  # requests are bound to the miner's hotkey: learn it first
                info = await d.call(target, "Info", pb.InfoRequest(), c.timeout_s)
                if not info.ok:
                    return info
                target = Target(c.axon, info.response.hotkey)
            req = pb.GenerateRequest(prompt_text=c.prompt, max_new_tokens=c.max_new_tokens, temperature=c.temperature)
            return await d.call(target, "Generate", req, c.timeout_s)
        finally:
            await d.close()

    result = asyncio.run(ask())
    if not result.ok:
        print(f"error: {result.code.name}: {result.message}", file=sys.stderr)
        if keypair is None and result.code.name == "UNAUTHENTICATED":
            print("this miner answers signed requests only: pass --wallet.name/--wallet.hotkey of a registered "
                  "validator hotkey", file=sys.stderr)
        return 1
    r = result.response
    if c.json:
        print(json.dumps({"text": r.text, "token_ids": list(r.token_ids), "logprobs": [round(x, 6) for x in r.logprobs],
                          "finish_reason": FINISH_OF[r.finish_reason].value if r.finish_reason in FINISH_OF else "unspecified",
                          "latency_ms": round(result.latency_s * 1000, 1), "signed": result.signed}))
    else:
        print(r.text)
    return 0


def cmd_gateway(argv: list[str], yaml_path: str | None) -> int:
    import dataclasses
    import time

    from neuron.gateway.keys import KeyLimits, KeyStore, KeyStoreError

    _, argv = _positional(argv, ("keys",), "gateway")
    action, argv = _positional(argv, ("add", "list", "revoke"), "gateway keys")
    c = _load(cfg.GatewayKeysConfig, "gateway", argv, yaml_path)
    if action in ("add", "revoke") and not c.name:
        raise cfg.ConfigError(f"neuron gateway keys {action} needs --name "
                              f"{'NAME' if action == 'add' else 'NAME_OR_ID'}")

    def limits(k: KeyLimits) -> str:
        per = [(k.requests_per_minute, "requests/min"), (k.tokens_per_minute, "tokens/min"),
               (k.max_concurrent, "concurrent")]
        return ", ".join(f"{n or 'unlimited'} {what}" for n, what in per)

    try:
        store = KeyStore(c.gateway.keys_path)
        if action == "add":
            key = store.add(c.name, KeyLimits(c.requests_per_minute, c.tokens_per_minute, c.max_concurrent))
            entry = store.lookup(key)
            print(f"added key {entry.name} ({entry.key_id}) to {store.path}: {limits(entry.limits)}")
            print(f"\nAPI key (shown once; only its hash is stored, it cannot be shown again):\n    {key}\n")
        elif action == "revoke":
            entry = store.revoke(c.name)
            print(f"revoked key {entry.name} ({entry.key_id}); a running gateway refuses it from its next request")
        elif c.json:
            print(json.dumps([{"name": k.name, "key_id": k.key_id, "limits": dataclasses.asdict(k.limits),
                               "created": k.created} for k in store.list()], indent=2))
        elif not (keys := store.list()):
            print(f"no API keys in {store.path}; add one with: neuron gateway keys add --name NAME")
        else:
            print(f"{'name':<20} {'id':<12} {'created (UTC)':<17} limits")
            for k in keys:
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.created))
                print(f"{k.name:<20} {k.key_id:<12} {created:<17} {limits(k.limits)}")
    except KeyStoreError as exc:
        raise cfg.ConfigError(str(exc)) from None
    return 0


def cmd_mocknet(argv: list[str], yaml_path: str | None) -> int:
    from neuron.harness.mocknet import main as mocknet_main

    return mocknet_main(_load(cfg.MocknetConfig, "mocknet", argv, yaml_path))


def cmd_bench(argv: list[str], yaml_path: str | None) -> int:
    from neuron.engine import BACKENDS
    from neuron.harness.bench.run import PARTS

    layers = (yaml_path,) if yaml_path is not None else ()  # no logs.setup: the bench logs warnings only, its own way
    c = cfg.load(cfg.BenchConfig, cfg.default_yaml("bench"), cfg.parse_dotted(argv), layers=layers)
    if c.engine.backend not in BACKENDS:
        raise cfg.ConfigError(f"--engine.backend {c.engine.backend}: expected one of {', '.join(BACKENDS)}")
    if unknown := [p for p in c.bench.only if p not in PARTS]:
        raise cfg.ConfigError(f"--bench.only {','.join(unknown)}: expected some of {','.join(PARTS)}")
    if "gpu" in c.bench.only and len(c.bench.only) > 1:
        raise cfg.ConfigError("--bench.only gpu runs alone")
    if c.engine.backend == "vllm":  # the vLLM engine against vLLM's own generate
        from neuron.harness.bench.vllm import main
    elif c.bench.only == ("gpu",):  # decode against generate and the bandwidth bound (docs/gpu.md)
        from neuron.harness.bench.gpu import main
    else:
        from neuron.harness.bench.run import main
    return main(c, argv)


COMMANDS: dict[str, Command] = {
    "miner": Command(cmd_miner, cfg.MinerConfig, "serve a model on an axon", "miner"),
    "validator": Command(cmd_validator, cfg.ValidatorConfig, "query, verify and score miners; set weights", "validator"),
    "mocknet": Command(cmd_mocknet, cfg.MocknetConfig, "a local chain, miners and a validator on this machine",
                       "mocknet"),
    "wallet": Command(cmd_wallet, cfg.WalletCommandConfig, "create (encrypted coldkey, mnemonic once), list, "
                      "regen from a mnemonic; password-env: unattended unlock", positional="create|list|regen|password-env"),
    "register": Command(cmd_register, cfg.RegisterConfig, "register a hotkey on a subnet (shows the cost, asks)"),
    "stake": Command(cmd_stake, cfg.StakeConfig, "add or remove stake (a validator permit needs stake)",
                     positional="add|remove"),
    "metagraph": Command(cmd_metagraph, cfg.MetagraphConfig, "print a subnet as a table"),
    "query": Command(cmd_query, cfg.QueryConfig, "ask a miner to generate text"),
    "gateway": Command(cmd_gateway, cfg.GatewayKeysConfig, "add, list or revoke the gateway's API keys",
                       positional="keys add|list|revoke"),
    "bench": Command(cmd_bench, cfg.BenchConfig, "measure batching, overhead and generation speed side by side",
                     "bench"),
}


def command_help(name: str) -> str:
    from neuron import help as help_text

    c = COMMANDS[name]
    return help_text.render(name, c.config, c.yaml, positional=c.positional)


def _split_config(rest: list[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` or `--config=PATH` taken out of the flags."""
    out, path, i = [], None, 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config":
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise cfg.ConfigError("--config needs a path: --config PATH or --config=PATH")
            path, i = rest[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if not path:
                raise cfg.ConfigError("--config needs a path: --config PATH or --config=PATH")
        else:
            out.append(arg)
        i += 1
    return path, out


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `neuron ... | head`: the reader has gone, so nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no error at exit's flush
        return 141  # as a process killed by SIGPIPE


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(f"neuron {version()}")
        return 0
    if argv[0] == "help":
        if len(argv) < 2:
            print(_usage())
            return 0
        argv = [argv[1], "--help"]
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean `neuron {close[0]}`?" if close else ""
        print(f"error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    spec = COMMANDS[command]
    if "-h" in rest or "--help" in rest:
        print(command_help(command))
        return 0
    logs.setup()
    try:
        yaml_path, rest = _split_config(rest)
        return spec.run(rest, yaml_path)
    except (cfg.ConfigError, ChainError) as exc:
        logger.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:
        from neuron.model import ModelNotFound, UnverifiablePrecision
        from neuron.wallets import WalletError

        if isinstance(exc, (ModelNotFound, UnverifiablePrecision, WalletError, OSError)):
            logger.error(str(exc))
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
