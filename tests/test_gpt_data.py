from gpt_data import batch_offsets, splitmix64


def test_batch_offsets_are_fixed_by_their_definition():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # SplitMix64's published first output for seed 0
    assert batch_offsets(1337, 0, 5, 3, 4, 1000) == [952, 390, 236, 777]
    assert batch_offsets(1337, 1, -1, 0, 2, 10**9) != batch_offsets(1337, 0, -1, 0, 2, 10**9)  # val and train differ
    # seeds that differ only above bit 32 (torch's CPU generator kept only the low 32 bits) differ here
    assert batch_offsets(1, 0, 0, 0, 8, 10**9) != batch_offsets(1 + 2**32, 0, 0, 0, 8, 10**9)
    draws = batch_offsets(7, 0, 0, 0, 10_000, 10)
    assert all(900 < draws.count(v) < 1100 for v in range(10))  # uniform enough
