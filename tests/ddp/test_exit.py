"""A finished DDP run with the hook exits 0: the exit wait releases the hook's completion callbacks before
the interpreter finalizes, and never waits for a future that did not complete."""

import torch


def test_then_waits_at_exit_for_callbacks_whose_future_completed():
    # A completed future's callback runs inline; one whose future never completes is not waited for.
    from dropgrad_dist.core.collectives import _Chains
    chains = _Chains()
    done, never = torch.futures.Future(), torch.futures.Future()
    done.set_result(torch.ones(2))
    assert torch.equal(chains.add(done, lambda fut: fut.value() * 2).wait(), torch.full((2,), 2.0))
    pending = chains.add(never, lambda fut: fut.value())
    assert chains.pending() == 0  # the first was released where it ran; the second's future is not done
    chains.wait_for_workers(timeout=0.05)  # returns at once: nothing completed is held
    never.set_result(torch.zeros(1))
    assert pending.done() and chains.pending() == 0
