//! The size of the rows sled keeps, and how items that share rows are cut
//! into them: one rule for every such row, and for the values split into
//! rows (`chunks.rs`).

/// The largest a row written by many (a commit's events, a batch's issued
/// SVIDs) should grow. sled splits a leaf once it holds more than 16
/// values, whatever their size, and writes any node past a quarter of its
/// 512 KiB segment to a file of its own in `blobs/`, which it never
/// fsyncs: an acknowledged write could then be lost, or the store left
/// unreadable, by a power cut, and each such file is created, written and
/// deleted again as the node changes. Rows of at most 4 KiB keep a leaf of
/// up to 30 of them under 128 KiB (`tests/tests/core_trust.rs::
/// signing_at_volume_writes_no_file_the_store_does_not_fsync`). A value
/// larger than this on its own (an event past 4 KiB once deflated, the
/// CRLs) is split into rows of this size in a tree of their own, in the
/// same commit (`chunks.rs`).
pub const ROW_BYTES: usize = 4 * 1024;

/// How many of the items whose encodings take `lens` bytes go in each row,
/// in order: up to `max_items` a row, and no more once the next would take
/// the row, with its own `overhead` bytes, past [`ROW_BYTES`] (an item
/// larger than that is a row of its own). The one rule of every row that
/// many values share.
pub fn row_sizes(
    lens: impl IntoIterator<Item = usize>,
    max_items: usize,
    overhead: usize,
) -> Vec<usize> {
    let mut sizes = Vec::new();
    let (mut items, mut bytes) = (0, overhead);
    for len in lens {
        if items > 0 && (items >= max_items || bytes + len > ROW_BYTES) {
            sizes.push(items);
            (items, bytes) = (0, overhead);
        }
        items += 1;
        bytes += len;
    }
    if items > 0 {
        sizes.push(items);
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows are cut by count and by bytes (with the row's own overhead),
    /// an item too large for any row is a row of its own, and nothing is
    /// left out.
    #[test]
    fn rows_are_cut_by_count_and_by_bytes() {
        assert_eq!(row_sizes([10; 7], 3, 0), [3, 3, 1]);
        assert_eq!(row_sizes([1000; 9], 64, 0), [4, 4, 1]);
        assert_eq!(row_sizes([1024; 4], 64, 1), [3, 1]);
        assert_eq!(row_sizes([10, ROW_BYTES * 2, 10], 64, 0), [1, 1, 1]);
        assert!(row_sizes([], 64, 0).is_empty());
    }
}
