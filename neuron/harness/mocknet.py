"""The mock network: a local chain, honest and dishonest miners as processes, and a validator, on loopback."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from neuron import config as cfg
from neuron.chain.local import LocalChain
from neuron.engine import BACKENDS, backend_of


@dataclass
class Node:
    name: str
    kind: str  # "honest", "validator", or a dishonest kind
    wallet: object
    uid: int = -1
    process: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class Result:
    """What the mock network shows after its rounds."""

    rows: list[dict] = field(default_factory=list)
    weights_by_round: list[list[float]] = field(default_factory=list)
    organic: dict = field(default_factory=dict)  # user traffic through the gateway (neuron.harness.users); {} if none
    workdir: Path | None = None  # chain, wallets, logs; None once removed
    interrupted: bool = False  # Ctrl-C: the rows are those of the rounds run so far

    @property
    def honest_weight(self) -> float:
        return sum(r["weight"] for r in self.rows if r["kind"] == "honest")

    @property
    def worst_dishonest_weight(self) -> float:
        return max((r["weight"] for r in self.rows if r["kind"] != "honest"), default=0.0)


def dev_wallet(path: Path, name: str):
    """A wallet with an unencrypted coldkey and hotkey "default" (local chains, benches; never real TAO)."""
    import bittensor as bt

    w = bt.Wallet(name=name, hotkey="default", path=str(path))
    w.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    w.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return w


def start_miner(node: Node, chain_path: Path, netuid: int, wallets: Path, logs: Path, model: str = "tiny",
                engine: str = "hf", extra: tuple[str, ...] = ()) -> None:
    """`node` as a miner process (`node.process`, its output in `logs`) serving `model` on loopback, port 0,
    on the local chain at `chain_path`; `extra`: more flags of `neuron miner`."""
    # Cheats run from the harness's own entry point: the production miner has no cheat switch.
    entry = ["neuron.cli", "miner"] if node.kind == "honest" else ["neuron.harness.cheat_miner", "--kind", node.kind]
    args = [sys.executable, "-m", *entry, "--model.name", model,
            "--subtensor.network", "local", "--subtensor.chain_path", str(chain_path), "--subtensor.netuid", str(netuid),
            "--wallet.name", node.name, "--wallet.hotkey", "default", "--wallet.path", str(wallets),
            "--axon.ip", "127.0.0.1", "--axon.port", "0", "--axon.external_ip", "127.0.0.1",
            "--auth.metagraph_refresh_s", "2", "--axon.grace_s", "1", *extra]
    if node.kind == "honest":  # cheats serve a model of their own: the HF engine's
        args += ["--engine.backend", engine]
        args += [x for key, value in backend_of(engine).shared_cpu.items() for x in (f"--{key}", str(value))]
    # One thread per miner: a dozen processes share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    node.log = logs / f"{node.name}.log"
    with open(node.log, "w") as log:
        node.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def wait_serving(chain: LocalChain, netuid: int, miners: list[Node], timeout_s: float) -> None:
    """Until every miner's axon is on the chain; raises if one exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        mg = chain.metagraph(netuid)
        waiting = [m for m in miners if (n := mg.by_uid(m.uid)) is None or n.axon is None]
        for m in miners:
            if m.process.poll() is not None:
                raise RuntimeError(f"miner {m.name} exited with {m.process.returncode} while starting:\n{_tail(m.log)}")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(waiting)} miners did not serve within {timeout_s:.0f} s: "
                               f"{', '.join(m.name for m in waiting)}")
        time.sleep(0.5)


def stop(miners: list[Node]) -> None:
    """SIGTERM to every miner still running, then SIGKILL to its process group past a deadline."""
    for m in miners:
        if m.process is not None and m.process.poll() is None:
            m.process.send_signal(signal.SIGTERM)
    # Each process's interpreter exit (torch, transformers) takes CPU: two dozen of them share two cores.
    deadline = time.monotonic() + max(10.0, 2.0 * len(miners))
    for m in miners:
        if m.process is None:
            continue
        try:
            m.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning(f"miner {m.name} did not stop in time; killing it")
            os.killpg(m.process.pid, signal.SIGKILL)
            m.process.wait()


async def _validate(c: cfg.MocknetConfig, chain: LocalChain, validator_node: Node, workdir: Path, result: Result,
                    miners: list[Node], holder: list):
    from neuron.harness.users import Traffic
    from neuron.model import load_model
    from neuron.validator.loop import Validator, start_gateway

    vc = cfg.with_overrides(cfg.ValidatorConfig(), **{
        "model.name": c.model, "subtensor.network": "local", "subtensor.chain_path": str(chain.path),
        "subtensor.netuid": c.netuid, "sample_size": len(miners), "timeout_s": c.timeout_s, "epoch_rounds": 1,
        "state_path": str(workdir / "validator_state.json"), "round_interval_s": 0.0,
        "max_new_tokens": c.max_new_tokens, "gateway.ip": "127.0.0.1", "gateway.port": 0, "gateway.auth": False,
        "gateway.verify_fraction": c.verify_fraction})
    lm = await asyncio.to_thread(load_model, c.model, "cpu", "float32")
    v = Validator(vc, chain, validator_node.wallet, lm)
    holder.append(v)  # the caller reads the partial state after a Ctrl-C
    server, task, gw = await start_gateway(v)
    cheats = {m.uid for m in miners if m.kind != "honest"}
    traffic = Traffic(gw, v, c.model, c.users, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1")
    declarations = asyncio.create_task(v.watch_declarations(asyncio.Event()))
    try:
        for _ in range(c.rounds):
            await v.run_round()
            result.weights_by_round.append(v.weights().tolist())
            traffic.after_round(len(result.weights_by_round), cheats)
        return v
    finally:
        declarations.cancel()
        await asyncio.gather(declarations, return_exceptions=True)
        try:
            result.organic = await traffic.finish()
        finally:
            server.should_exit = True
            await task
            await gw.stop()
            await v.close()


def run(c: cfg.MocknetConfig, result: Result | None = None) -> Result:
    """Start everything, run the rounds, stop everything; the per-uid result.

    A temporary work directory is removed at the end unless --keep; it is kept (and named) after a
    Ctrl-C or a failure, since its logs say what happened.
    """
    temporary = not c.workdir
    workdir = Path(c.workdir or tempfile.mkdtemp(prefix="neuron-mocknet-"))
    result = result or Result()
    result.workdir = workdir
    keep = c.keep or not temporary
    try:
        _run(c, workdir, result)
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            logger.info(f"mock network files (chain, wallets, logs/) kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            result.workdir = None
    return result


def _run(c: cfg.MocknetConfig, workdir: Path, result: Result) -> None:
    wallets, logs = workdir / "wallets", workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    chain = LocalChain(workdir / "chain.sqlite", block_time=c.block_time_s)
    n_nodes = 1 + c.honest + len(c.dishonest)
    chain.create_subnet(c.netuid, max_uids=max(64, n_nodes), weights_rate_limit=1, min_validator_stake=1.0,
                        max_validators=4, immunity_period=10_000)
    validator = Node("validator", "validator", dev_wallet(wallets, "validator"))
    miners = [Node(f"honest-{i}", "honest", dev_wallet(wallets, f"honest-{i}")) for i in range(c.honest)]
    miners += [Node(f"cheat-{k}", k, dev_wallet(wallets, f"cheat-{k}")) for k in c.dishonest]
    for node in [validator, *miners]:
        node.uid, _ = chain.register(c.netuid, node.wallet)
    chain.add_stake(c.netuid, validator.wallet.hotkey.ss58_address, 1000.0)
    logger.info(f"mock network in {workdir}: local chain, validator uid {validator.uid}, {len(miners)} miners "
                f"({c.honest} honest, {len(c.dishonest)} dishonest)")
    holder: list = []
    try:
        for m in miners:
            start_miner(m, chain.path, c.netuid, wallets, logs, c.model, c.engine)
        wait_serving(chain, c.netuid, miners, c.startup_timeout_s)
        logger.info(f"all {len(miners)} miners serve; running {c.rounds} validator rounds")
        asyncio.run(_validate(c, chain, validator, workdir, result, miners, holder))
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        stop(miners)
    if holder:
        _fill_rows(result, holder[0], chain.metagraph(c.netuid), miners)
    if result.interrupted:
        raise KeyboardInterrupt


def _fill_rows(result: Result, v, mg, miners: list[Node]) -> None:
    weights = v.weights()
    for m in miners:
        stats = v.state.stats.get(str(m.uid))
        queried = stats.queried if stats else 0
        reasons = sorted(stats.reasons.items(), key=lambda kv: -kv[1]) if stats else []
        result.rows.append({
            "uid": m.uid, "hotkey": m.wallet.hotkey.ss58_address, "kind": m.kind,
            "verified_fraction": (stats.verified / queried) if queried else 0.0, "queried": queried,
            "score": v.state.scores[m.uid] if m.uid < len(v.state.scores) else 0.0,
            "weight": float(weights[m.uid]) if m.uid < len(weights) else 0.0,
            "incentive": mg.by_uid(m.uid).incentive, "caught_for": reasons[0][0] if reasons else "",
        })


def print_table(result: Result) -> None:
    print(f"{'uid':>4}  {'kind':<11} {'verified':>8}  {'score':>6}  {'weight':>7}  {'incentive':>9}  caught for")
    for r in sorted(result.rows, key=lambda r: (r["kind"] != "honest", r["uid"])):
        print(f"{r['uid']:>4}  {r['kind']:<11} {r['verified_fraction']:>8.0%}  {r['score']:>6.3f}  {r['weight']:>7.3f}  "
              f"{r['incentive']:>9.3f}  {r['caught_for'] or '-'}")
    print(f"honest miners hold {result.honest_weight:.1%} of the weight; the best dishonest miner holds "
          f"{result.worst_dishonest_weight:.1%}")
    o = result.organic
    if o:
        print(f"users: {o['requests']} requests, {o['answered']:.1%} answered, ttft p50 {o['ttft_p50_ms']:.0f} ms "
              f"p99 {o['ttft_p99_ms']:.0f} ms, {o['tokens_per_s']:.0f} tokens/s; "
              f"{sum(o['cheat_tokens_after_flagged'].values())} user tokens from flagged cheats after they were flagged"
              + (f" (errors: {', '.join(f'{k} x{n}' for k, n in o['errors'].items())})" if o["errors"] else ""))


def plot(result: Result, path: str) -> None:
    """Two panels: the weight held by honest miners and by each cheat kind over rounds; the final weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = range(1, len(result.weights_by_round) + 1)

    def held(uids: list[int]) -> list[float]:
        return [sum(w[u] for u in uids if u < len(w)) for w in result.weights_by_round]

    honest = [r["uid"] for r in result.rows if r["kind"] == "honest"]
    cheats = [r["uid"] for r in result.rows if r["kind"] != "honest"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    left.plot(rounds, held(honest), color="tab:green", linewidth=3, marker="o", label=f"honest ({len(honest)} miners)")
    left.plot(rounds, held(cheats), color="tab:red", linewidth=3, marker="o", linestyle="--",
              label=f"dishonest ({len(cheats)} miners, every kind; each one on the right)")
    left.xaxis.get_major_locator().set_params(integer=True)
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("round")
    left.set_ylabel("share of the validator's weight")
    left.set_title("Weight held by honest and dishonest miners")
    left.legend(fontsize=8, loc="center right")
    left.grid(alpha=0.3)
    rows = sorted(result.rows, key=lambda r: (r["kind"] != "honest", -r["weight"], r["uid"]))
    labels = [f"uid {r['uid']} {r['kind']}" for r in rows]
    right.barh(labels, [r["weight"] for r in rows],
               color=["tab:green" if r["kind"] == "honest" else "tab:red" for r in rows])
    for y, r in enumerate(rows):
        if r["kind"] != "honest":
            right.text(0.01, y, (r["caught_for"] or "-")[:38], va="center", fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("final weight (red: dishonest, with what caught it)")
    right.set_title("Final weight per miner")
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(c: cfg.MocknetConfig) -> int:
    from neuron.harness.cheats import lookup

    for kind in c.dishonest:
        try:
            lookup(kind)
        except ValueError as exc:
            raise cfg.ConfigError(f"--dishonest: {exc}") from None
    if c.plot and importlib.util.find_spec("matplotlib") is None:
        raise cfg.ConfigError("--plot needs matplotlib, which a production install leaves out: "
                              "pip install -e \".[harness]\"")
    if c.engine not in BACKENDS:
        raise cfg.ConfigError(f"--engine {c.engine}: expected one of {', '.join(BACKENDS)}")
    result = Result()

    def interrupt(signum, _frame):
        raise KeyboardInterrupt

    # SIGTERM too (a supervisor, `kill`): either way the miners are stopped, not orphaned.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run(c, result)
    except KeyboardInterrupt:
        print(f"interrupted: the table covers the {len(result.weights_by_round)} rounds run so far")
        if result.rows:
            print_table(result)
        print(f"logs: {result.workdir / 'logs'} (chain, wallets and validator state beside them)")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_table(result)
    if c.report:
        Path(c.report).write_text(json.dumps({"rows": result.rows, "honest_weight": result.honest_weight,
                                              "weights_by_round": result.weights_by_round, "organic": result.organic},
                                             indent=2))
        print(f"report: {c.report}")
    if c.plot:
        plot(result, c.plot)
        print(f"plot: {c.plot}")
    return 0
