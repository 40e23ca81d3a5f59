"""`neuron miner|validator|register|metagraph|wallet|query|mocknet|bench`: config, logging, and exit codes live here."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from loguru import logger

from neuron import config as cfg
from neuron.chain.base import ChainError

USAGE = """neuron <command> [options] [--section.name VALUE ...]

commands:
  miner       serve a model on an axon                 (config/miner.yaml)
  validator   query, verify and score miners            (config/validator.yaml)
  mocknet     a local chain, miners and a validator     (config/mocknet.yaml)
  register    register a hotkey on a subnet
  metagraph   print a subnet as a table
  wallet      create a wallet: neuron wallet create --wallet.name N --wallet.hotkey H
  query       ask a miner to generate: neuron query --axon HOST:PORT --prompt TEXT
  bench       measure batching, overhead and generation speed side by side

Any config field can be set with a dotted flag, e.g. --axon.port 8091 --model.name tiny --logging.debug.
"""


def setup_logging(debug: bool = False, as_json: bool = False) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if debug else "INFO", serialize=as_json,
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}")


def _config(cls, name: str, argv: list[str], yaml_path: str | None):
    path = yaml_path or str(cfg.CONFIG_DIR / f"{name}.yaml")
    return cfg.load(cls, path if Path(path).exists() else None, cfg.parse_dotted(argv))


def _chain(sub: cfg.SubtensorConfig):
    if sub.network == "none":
        return None
    from neuron.chain import open_chain

    if sub.network == "local" and not sub.chain_path:
        raise cfg.ConfigError("--subtensor.network local needs --subtensor.chain_path (the local chain's SQLite file)")
    return open_chain(sub.network, sub.chain_path or None)


def cmd_miner(argv: list[str], yaml_path: str | None) -> int:
    from neuron.miner import run_miner
    from neuron.wallets import open_wallet

    c = _config(cfg.MinerConfig, "miner", argv, yaml_path)
    setup_logging(c.logging.debug, c.logging.json)
    chain = _chain(c.subtensor)
    if c.dishonest and (c.subtensor.network != "local"):
        raise cfg.ConfigError("--dishonest is for the mock network only: it needs --subtensor.network local")
    wallet = open_wallet(c.wallet) if (chain is not None or c.auth.required) else None
    if c.dishonest:
        from neuron.adversaries import KINDS

        if c.dishonest not in KINDS:
            raise cfg.ConfigError(f"--dishonest {c.dishonest}: expected one of {', '.join(KINDS)}")
    asyncio.run(run_miner(c, chain, wallet))
    return 0


def cmd_validator(argv: list[str], yaml_path: str | None) -> int:
    from neuron.validator import run_validator
    from neuron.wallets import open_wallet

    c = _config(cfg.ValidatorConfig, "validator", argv, yaml_path)
    setup_logging(c.logging.debug, c.logging.json)
    chain = _chain(c.subtensor)
    if chain is None:
        raise cfg.ConfigError("the validator needs a chain: set --subtensor.network")
    asyncio.run(run_validator(c, chain, open_wallet(c.wallet)))
    return 0


def _wallet_and_chain(argv: list[str], parser: argparse.ArgumentParser):
    args, rest = parser.parse_known_args(argv)
    over = cfg.parse_dotted(rest)
    wallet_cfg = cfg.load(cfg.WalletConfig, None, {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("wallet.")})
    sub = cfg.load(cfg.SubtensorConfig, None, {k.split(".", 1)[1]: v for k, v in over.items() if k.startswith("subtensor.")})
    unknown = [k for k in over if not k.startswith(("wallet.", "subtensor."))]
    if unknown:
        raise cfg.ConfigError(f"unknown option(s): {', '.join('--' + k for k in unknown)}")
    return args, wallet_cfg, sub


def cmd_wallet(argv: list[str], _yaml) -> int:
    from neuron.wallets import create_wallet

    parser = argparse.ArgumentParser(prog="neuron wallet", description="create a wallet without prompts")
    parser.add_argument("action", choices=["create"])
    _, wallet_cfg, _ = _wallet_and_chain(argv, parser)
    wallet, created = create_wallet(wallet_cfg)
    print(f"created {' and '.join(created)} for {wallet_cfg.name}/{wallet_cfg.hotkey} in {wallet_cfg.path}")
    print(f"coldkey {wallet.coldkeypub.ss58_address}")
    print(f"hotkey  {wallet.hotkey.ss58_address}")
    return 0


def cmd_register(argv: list[str], _yaml) -> int:
    from neuron.wallets import open_wallet

    parser = argparse.ArgumentParser(prog="neuron register", description="register a hotkey on a subnet")
    parser.add_argument("--netuid", type=int, required=True)
    args, wallet_cfg, sub = _wallet_and_chain(argv, parser)
    wallet = open_wallet(wallet_cfg)
    chain = _chain(sub)
    if chain is None:
        raise cfg.ConfigError("register needs a chain: set --subtensor.network (finney, test, local, or an endpoint)")
    # A local chain starts empty; its subnets are created on first use, as a new user would expect.
    if sub.network == "local" and chain.create_subnet(args.netuid):
        logger.info(f"created subnet {args.netuid} on the local chain {sub.chain_path} with default settings")
    uid, new = chain.register(args.netuid, wallet)
    hotkey = wallet.hotkey.ss58_address
    if new:
        print(f"registered hotkey {hotkey} on netuid {args.netuid} as uid {uid}")
    else:
        print(f"hotkey {hotkey} is already registered on netuid {args.netuid} as uid {uid}; nothing to do")
    return 0


def cmd_metagraph(argv: list[str], _yaml) -> int:
    parser = argparse.ArgumentParser(prog="neuron metagraph", description="print a subnet as a table")
    parser.add_argument("--netuid", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, _, sub = _wallet_and_chain(argv, parser)
    chain = _chain(sub)
    if chain is None:
        raise cfg.ConfigError("metagraph needs a chain: set --subtensor.network (finney, test, local, or an endpoint)")
    mg = chain.metagraph(args.netuid)
    rows = [dict(uid=n.uid, hotkey=n.hotkey, coldkey=n.coldkey, stake=n.stake, permit=n.validator_permit,
                 axon=str(n.axon) if n.axon else "", incentive=n.incentive, last_update=n.last_update)
            for n in mg.neurons]
    if args.json:
        print(json.dumps({"netuid": mg.netuid, "block": mg.block, "neurons": rows}, indent=2))
        return 0
    print(f"netuid {mg.netuid} at block {mg.block}: {len(rows)} neurons")
    print(f"{'uid':>4}  {'hotkey':<48}  {'stake':>10}  {'permit':>6}  {'axon':<21}  {'incentive':>9}  {'updated':>7}")
    for r in rows:
        print(f"{r['uid']:>4}  {r['hotkey']:<48}  {r['stake']:>10.3f}  {'yes' if r['permit'] else 'no':>6}  "
              f"{r['axon'] or '-':<21}  {r['incentive']:>9.4f}  {r['last_update']:>7}")
    return 0


def cmd_query(argv: list[str], _yaml) -> int:
    from neuron.dendrite import Dendrite, Target
    from neuron.pb.neuron.v1 import axon_pb2 as pb
    from neuron.protocol import FINISH_NAMES
    from neuron.wallets import open_wallet

    parser = argparse.ArgumentParser(prog="neuron query", description="ask a miner to generate text")
    parser.add_argument("--axon", required=True, help="HOST:PORT of the miner")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", action="store_true", help="print a JSON object (text, token_ids, ...)")
    args, wallet_cfg, _ = _wallet_and_chain(argv, parser)
    signed = any(a.startswith("--wallet.") for a in argv)
    keypair = open_wallet(wallet_cfg).hotkey if signed else None

    async def ask():
        d = Dendrite(keypair)
        try:
            target = Target(args.axon)
            if keypair is not None:  # requests are bound to the miner's hotkey: learn it first
                info = await d.call(target, "Info", pb.InfoRequest(), args.timeout)
                if not info.ok:
                    return info
                target = Target(args.axon, info.response.hotkey)
            req = pb.GenerateRequest(prompt_text=args.prompt, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature)
            return await d.call(target, "Generate", req, args.timeout)
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
    if args.json:
        print(json.dumps({"text": r.text, "token_ids": list(r.token_ids), "logprobs": [round(x, 6) for x in r.logprobs],
                          "finish_reason": FINISH_NAMES.get(r.finish_reason, "unspecified"),
                          "latency_ms": round(result.latency_s * 1000, 1), "signed": result.signed}))
    else:
        print(r.text)
    return 0


def cmd_mocknet(argv: list[str], yaml_path: str | None) -> int:
    from neuron.mocknet import main as mocknet_main

    return mocknet_main(argv, yaml_path)


def cmd_bench(argv: list[str], _yaml) -> int:
    from neuron import bench_vllm

    if bench_vllm.wants_vllm(argv):
        return bench_vllm.main(argv)
    from neuron.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"miner": cmd_miner, "validator": cmd_validator, "register": cmd_register, "metagraph": cmd_metagraph,
            "wallet": cmd_wallet, "query": cmd_query, "mocknet": cmd_mocknet, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    yaml_path = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            print("error: --config needs a path", file=sys.stderr)
            return 2
        yaml_path = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    setup_logging()
    try:
        return COMMANDS[command](rest, yaml_path)
    except (cfg.ConfigError, ChainError) as exc:
        logger.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from neuron.model import ModelNotFound
        from neuron.wallets import WalletError

        if isinstance(exc, (ModelNotFound, WalletError, OSError)):
            logger.error(str(exc))
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
