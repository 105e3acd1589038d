//! One colour per term name, the same in every run: `loss` is always blue, every other name
//! takes the palette entry its stable hash points at, so `l2` is the same colour in this run and
//! the next. A `val_` series takes its term's colour (it is drawn dashed).

use plotters::style::RGBColor;

/// The colour of `loss` (and `val_loss`): matplotlib's first colour, as Keras users know it.
pub(crate) const LOSS: RGBColor = RGBColor(0x1f, 0x77, 0xb4);

/// The colours of every other term: matplotlib's tab10 without its blue, then dark teal and
/// near-black, all distinct from one another and from `LOSS` and readable on white (no second
/// blue: the default run's `digit_loss` was navy beside `loss`'s blue, hard to tell apart).
pub(crate) const PALETTE: [RGBColor; 11] = [
    RGBColor(0xff, 0x7f, 0x0e), // orange
    RGBColor(0x2c, 0xa0, 0x2c), // green
    RGBColor(0xd6, 0x27, 0x28), // red
    RGBColor(0x94, 0x67, 0xbd), // purple
    RGBColor(0x8c, 0x56, 0x4b), // brown
    RGBColor(0xe3, 0x77, 0xc2), // pink
    RGBColor(0x7f, 0x7f, 0x7f), // grey
    RGBColor(0xbc, 0xbd, 0x22), // olive
    RGBColor(0x17, 0xbe, 0xcf), // cyan
    RGBColor(0x00, 0x6d, 0x5b), // dark teal
    RGBColor(0x26, 0x26, 0x26), // near-black
];

/// The term a series belongs to: `val_l2` → `l2`, and a term's gradient norm to the term,
/// so that it has the term's colour: `grad_norm/l2` and `val_grad_norm/l2` → `l2`.
pub(crate) fn term_of(series: &str) -> &str {
    let series = series.strip_prefix("val_").unwrap_or(series);
    series.strip_prefix("grad_norm/").unwrap_or(series)
}

/// FNV-1a: a hash that does not change between runs, versions or machines (unlike std's
/// `DefaultHasher`, whose algorithm is unspecified).
fn stable_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The palette entry a term prefers: fixed by its name alone.
pub(crate) fn preferred(term: &str) -> usize {
    (stable_hash(term) % PALETTE.len() as u64) as usize
}

/// The colours of the terms drawn together. Each takes its preferred entry; when two names of
/// one plot share it, the one later in alphabetical order takes the next free entry, so the
/// colours stay distinct and a name changes colour only beside a name it collides with.
pub(crate) fn assign<'a>(terms: impl IntoIterator<Item = &'a str>) -> Vec<(String, RGBColor)> {
    let mut names: Vec<&str> = terms.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let mut taken = [false; PALETTE.len()];
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        if name == "loss" {
            out.push((name.to_string(), LOSS));
            continue;
        }
        let first = preferred(name);
        let slot = (0..PALETTE.len())
            .map(|i| (first + i) % PALETTE.len())
            .find(|&i| !taken[i])
            .unwrap_or(first);
        taken[slot] = true;
        out.push((name.to_string(), PALETTE[slot]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_keeps_its_colour_across_runs() {
        // Fixed values: a change of hash or palette would recolour every user's plots.
        assert_eq!(stable_hash("l2"), 0x08ad_0e07_b553_afdb);
        let alone = assign(["l2"]);
        let with_others = assign(["loss", "fgsm", "l2", "digit_loss"]);
        let l2 = |v: &[(String, RGBColor)]| v.iter().find(|(n, _)| n == "l2").unwrap().1;
        assert_eq!(l2(&alone), l2(&with_others));
        assert_eq!(l2(&alone), PALETTE[preferred("l2")]);
        let loss = with_others.iter().find(|(n, _)| n == "loss").unwrap().1;
        assert_eq!(loss, LOSS);
        assert_eq!(term_of("val_l2"), "l2");
        assert_eq!(term_of("loss"), "loss");
        assert_eq!(term_of("grad_norm/digit_loss"), "digit_loss");
        assert_eq!(term_of("val_grad_norm/digit_loss"), "digit_loss");
        assert_eq!(term_of("grad_cos/digit_loss/l2"), "grad_cos/digit_loss/l2");
    }

    #[test]
    fn the_terms_of_one_plot_get_distinct_colours() {
        let names: Vec<String> = (0..PALETTE.len()).map(|i| format!("term{i}")).collect();
        let mut colours: Vec<RGBColor> = assign(names.iter().map(String::as_str))
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        colours.push(LOSS);
        let n = colours.len();
        colours.sort_by_key(|c| (c.0, c.1, c.2));
        colours.dedup();
        assert_eq!(colours.len(), n, "two terms share a colour");
    }
}
