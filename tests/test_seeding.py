# SPDX-License-Identifier: Apache-2.0
"""Named random streams: distinct per stream and index, reproducible, and isolated."""

import torch

from pyro_arm.sbn.seeding import Stream, derived_seed, forked, generator


def test_streams_are_distinct_and_reproducible():
    seeds = {derived_seed(0, s, i) for s in Stream for i in range(3)}
    assert len(seeds) == 3 * len(Stream)
    assert derived_seed(7, Stream.ORDER, 2) == derived_seed(7, Stream.ORDER, 2)
    assert derived_seed(0, Stream.GUIDE) != derived_seed(1, Stream.GUIDE)
    a = torch.rand(4, generator=generator(0, Stream.BINARIZE, 5))
    b = torch.rand(4, generator=generator(0, Stream.BINARIZE, 5))
    assert torch.equal(a, b)


def test_stream_numbers_are_the_checkpoint_format():
    # the seeds of existing runs depend on these numbers
    assert [int(s) for s in Stream] == [0, 1, 2, 3, 4, 5]


def test_forked_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with forked(0, Stream.VALID, 1, device=torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with forked(0, Stream.VALID, 1, device=torch.device("cpu")):
        assert torch.equal(torch.rand(3), inside)
