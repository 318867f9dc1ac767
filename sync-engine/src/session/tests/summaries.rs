//! Block summaries: what the receiver's values say about a file the sender changed.

use super::*;

fn cvs(n: usize, seed: u8) -> Vec<Cv> {
    (0..n)
        .map(|i| *blake3::hash(&[seed, i as u8, (i >> 8) as u8]).as_bytes())
        .collect()
}

#[test]
fn summaries_find_exactly_the_changed_blocks_of_a_same_size_file() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(300, 1);
    let mut ours = theirs.clone();
    ours[7] = [9; 32];
    ours[250] = [9; 32];
    let len = 300 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(sums.iter().all(|s| matches!(s, BlockSum::One(_))));
    let ranges = changed_ranges(&ours, &sums, bs, len);
    assert_eq!(
        ranges,
        vec![
            (7 * bs.get(), 8 * bs.get()),
            (250 * bs.get(), 251 * bs.get())
        ]
    );
}

#[test]
fn a_grown_file_is_summarised_coarsely_in_the_middle_and_finely_at_the_ends() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(1000, 2);
    // Header rewritten, last block changed, 40 blocks appended.
    let mut ours = theirs.clone();
    ours[0] = [1; 32];
    ours[999] = [2; 32];
    ours.extend(cvs(40, 3));
    let len = 1040 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(sums.len() < 80, "{} summaries for 1000 blocks", sums.len());
    let ranges = changed_ranges(&ours, &sums, bs, len);
    assert_eq!(
        ranges,
        vec![(0, bs.get()), (999 * bs.get(), 1040 * bs.get())]
    );
    // A change in the middle costs its whole group, never a wrong block.
    ours[500] = [3; 32];
    let ranges = changed_ranges(&ours, &sums, bs, len);
    let sent: u64 = ranges.iter().map(|(a, b)| b - a).sum();
    assert!(
        ranges
            .iter()
            .any(|(a, b)| *a <= 500 * bs.get() && 501 * bs.get() <= *b)
    );
    assert!(sent <= (1 + GROUP_BLOCKS as u64 + 41) * bs.get(), "{sent}");
}

#[test]
fn summaries_compared_frame_by_frame_find_what_they_find_at_once() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(1000, 4);
    let mut ours = theirs.clone();
    for changed in [0, 3, 4, 500, 998] {
        ours[changed] = [8; 32];
    }
    ours.truncate(990);
    let len = 990 * bs.get() - 100;
    for new_len in [1000 * bs.get(), 1200 * bs.get()] {
        let sums: Vec<BlockSum> =
            block_sums(theirs.iter().copied(), theirs.len() as u64, bs, new_len).collect();
        let at_once = changed_ranges(&ours, &sums, bs, len);
        assert_eq!(changed_ranges_in_frames(&ours, &sums, bs, len, 7), at_once);
        assert!(at_once.first().is_some_and(|r| r.0 == 0));
        assert!(
            at_once
                .iter()
                .any(|r| r.0 <= 500 * bs.get() && 501 * bs.get() <= r.1)
        );
    }
}

#[test]
fn summaries_of_a_list_of_several_parts_are_compared_across_part_boundaries() {
    let bs = BlockSize::DEFAULT;
    let theirs = cvs(3 * PART_CVS + 50, 6);
    let mut ours = theirs.clone();
    // Changed on both sides of a part boundary, and the file grew: the middle goes in groups
    // that straddle the boundaries.
    let boundary = PART_CVS;
    for changed in [1, boundary - 1, boundary, 2 * boundary + 3] {
        ours[changed] = [7; 32];
    }
    ours.extend(cvs(30, 1));
    let len = ours.len() as u64 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    let ranges = changed_ranges_in_frames(&ours, &sums, bs, len, 100);
    for changed in [1, boundary - 1, boundary, 2 * boundary + 3] {
        let at = changed as u64 * bs.get();
        assert!(
            ranges.iter().any(|r| r.0 <= at && at + bs.get() <= r.1),
            "block {changed} not sent: {ranges:?}"
        );
    }
    let sent: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        sent <= (4 * GROUP_BLOCKS as u64 + 30 + 8) * bs.get(),
        "{ranges:?}"
    );
    assert_eq!(ranges.last().map(|r| r.1), Some(len));
}

#[test]
fn a_large_grown_file_is_summarised_in_at_most_so_many_groups() {
    let bs = BlockSize::DEFAULT;
    // A 1 GiB file that grew: its middle in groups of 64 blocks, not 16.
    let theirs = cvs(65_536, 8);
    let mut ours = theirs.clone();
    ours[30_000] = [4; 32];
    ours.extend(cvs(100, 9));
    let len = ours.len() as u64 * bs.get();
    let sums: Vec<BlockSum> =
        block_sums(theirs.iter().copied(), theirs.len() as u64, bs, len).collect();
    assert!(
        sums.len() as u64 <= MAX_MIDDLE_GROUPS + 2 * EDGE_BLOCKS as u64,
        "{} summaries",
        sums.len()
    );
    assert!(sums.iter().any(|s| s.blocks() == 64));
    // Made as the values pass, the digests are group_digest's.
    let first_group = &theirs[EDGE_BLOCKS..EDGE_BLOCKS + 64];
    assert!(sums.contains(&BlockSum::Group {
        count: 64,
        digest: group_digest(first_group),
    }));
    let ranges = changed_ranges(&ours, &sums, bs, len);
    let sent: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    assert!(
        ranges
            .iter()
            .any(|r| r.0 <= 30_000 * bs.get() && 30_001 * bs.get() <= r.1)
    );
    assert!(sent <= (64 + 100 + 1) * bs.get(), "{ranges:?}");
}
