//! Checking the client's regions before anything is done with them: sizes, alignment,
//! overflow, bounds in the memory file, overlaps, one page size.

use super::{
    GuestRegionUffdMapping, HandshakeError, Limits, ValidatedRegion, PAGE_SIZE_2M, PAGE_SIZE_4K,
};

/// Checks the mappings against each other and against a memory file of `mem_len` bytes (pass
/// `u64::MAX` for no file bound), returning the regions in the client's order.
///
/// Refused: an empty list, more than [`Limits::max_regions`], a zero size, a page size other than
/// 4096 or 2097152 or two page-size fields that disagree, a base, size or offset not aligned to
/// the region's page size, `base + size` or `offset + size` overflowing, `offset + size` past
/// `mem_len`, regions with different page sizes, and overlapping regions. Regions may share file
/// bytes (two regions reading the same offsets is harmless).
pub fn validate(
    mappings: &[GuestRegionUffdMapping],
    mem_len: u64,
    limits: &Limits,
) -> Result<Vec<ValidatedRegion>, HandshakeError> {
    if mappings.is_empty() {
        return Err(HandshakeError::Empty);
    }
    if mappings.len() > limits.max_regions {
        return Err(HandshakeError::TooManyRegions {
            count: mappings.len(),
            limit: limits.max_regions,
        });
    }
    let mut regions: Vec<ValidatedRegion> = Vec::with_capacity(mappings.len());
    for (index, mapping) in mappings.iter().enumerate() {
        regions.push(validate_one(index, mapping, mem_len)?);
    }
    if let Some(first) = regions.first() {
        let first = first.page_size;
        if let Some((index, region)) = regions
            .iter()
            .enumerate()
            .find(|(_, region)| region.page_size != first)
        {
            return Err(HandshakeError::MixedPageSizes {
                index,
                page_size: region.page_size,
                first,
            });
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_unstable_by_key(|&index| regions[index].start);
    for pair in order.windows(2) {
        let (low, high) = (&regions[pair[0]], &regions[pair[1]]);
        if low.end() > high.start {
            return Err(HandshakeError::Overlap {
                first: pair[0],
                first_start: low.start,
                first_end: low.end(),
                second: pair[1],
                second_start: high.start,
                second_end: high.end(),
            });
        }
    }
    Ok(regions)
}

fn validate_one(
    index: usize,
    mapping: &GuestRegionUffdMapping,
    mem_len: u64,
) -> Result<ValidatedRegion, HandshakeError> {
    let page_size = mapping.stated_page_size(index)?;
    if page_size != PAGE_SIZE_4K && page_size != PAGE_SIZE_2M {
        return Err(HandshakeError::UnsupportedPageSize { index, page_size });
    }
    let size = mapping.size;
    if size == 0 {
        return Err(HandshakeError::ZeroSize { index });
    }
    for (field, value) in [
        ("base_host_virt_addr", mapping.base_host_virt_addr),
        ("size", size),
        ("offset", mapping.offset),
    ] {
        if value % page_size != 0 {
            return Err(HandshakeError::Unaligned {
                index,
                field,
                value,
                page_size,
            });
        }
    }
    let overflow = |field: &'static str, value: u64| HandshakeError::Overflow {
        index,
        field,
        value,
        size,
    };
    mapping
        .base_host_virt_addr
        .checked_add(size)
        .ok_or_else(|| overflow("base_host_virt_addr", mapping.base_host_virt_addr))?;
    let file_end = mapping
        .offset
        .checked_add(size)
        .ok_or_else(|| overflow("offset", mapping.offset))?;
    if file_end > mem_len {
        return Err(HandshakeError::BeyondFile {
            index,
            offset: mapping.offset,
            size,
            mem_len,
        });
    }
    Ok(ValidatedRegion {
        start: mapping.base_host_virt_addr,
        len: size,
        page_size,
        offset: mapping.offset,
    })
}
