"""The driver hands a sweep's prepared inputs to its group actors without waiting for them
(`tuning.raytune.driver.hand_inputs`): an actor whose process is still starting takes them
once it is up, and Tune's trials start meanwhile (their joins wait for the inputs)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trainer.inputs import Inputs, inputs_from_data
from tuning.raytune.driver import GROUP_INPUTS, SharedGroups, hand_inputs

pytestmark = pytest.mark.integration


def test_the_inputs_are_handed_to_an_actor_still_starting_without_waiting_for_it(tmp_path):
    ray = pytest.importorskip("ray")
    import json

    gate = tmp_path / "gate"  # the actor's constructor holds until the test writes it

    class Starting:
        def __init__(self, gate: str) -> None:
            while not Path(gate).exists():
                time.sleep(0.05)
            self.inputs = None

        def set_inputs(self, inputs: Inputs) -> None:
            self.inputs = inputs

        def got(self) -> Inputs | None:
            return self.inputs

    inputs = Inputs(bundle_dir=None, llm_dir=tmp_path / "llm", manifest=tmp_path / "m.jsonl",
                    eval_manifest=None, feature_cache=tmp_path / "f.safetensors",
                    eval_feature_cache=None)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        actor = ray.remote(Starting).options(max_concurrency=4).remote(str(gate))
        groups = SharedGroups(plan=None, actors=[actor])
        handed = threading.Event()
        threading.Thread(target=lambda: (hand_inputs(groups, inputs, tmp_path),
                                         handed.set()), daemon=True).start()
        # Returned with the actor's constructor still held: the call did not wait for it.
        assert handed.wait(60), "hand_inputs waited for an actor that had not started"
        written = json.loads((tmp_path / GROUP_INPUTS).read_text())
        assert inputs_from_data(written) == inputs  # for an actor Ray restarts
        gate.write_text("go")
        # A threaded actor (as the group's is) runs calls side by side, in no set order.
        deadline = time.monotonic() + 120
        while (got := ray.get(actor.got.remote(), timeout=120)) is None:
            assert time.monotonic() < deadline, "the actor never took the inputs"
            time.sleep(0.05)
        assert got == inputs
        assert len(groups.handed) == 1
    finally:
        ray.shutdown()
