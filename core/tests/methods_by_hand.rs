//! Hand-computed checks of the merge methods (spec §4), through smelt-core's
//! public API. Every expected value below is worked out by hand (in the
//! comments) or by a few lines of independent arithmetic — never with
//! smelt's own helpers.

use smelt_core::methods::{self, MergeJob, MergeMethod, ParamValues, ValidateCtx};
use smelt_core::{DType, Tensor};

// ---------------------------------------------------------------------------
// Harness: parameter maps built the way the planner builds them
// ---------------------------------------------------------------------------

type Kv<'a> = &'a [(&'a str, f64)];

fn method(name: &str) -> Box<dyn MergeMethod> {
    methods::get(name).unwrap_or_else(|| panic!("no method {name}"))
}

/// Global parameters: each method's defaults, overridden by `over`.
fn globals(m: &dyn MergeMethod, over: Kv) -> ParamValues {
    let mut g: ParamValues = m
        .global_params()
        .iter()
        .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
        .collect();
    for (k, v) in over {
        g.insert(k.to_string(), *v);
    }
    g
}

/// Per-model parameters: the method's per-model defaults (the base gets them
/// too, but no weight unless one is given), overridden by `over`.
fn model_values(m: &dyn MergeMethod, over: Kv) -> ParamValues {
    let mut pv: ParamValues = m
        .model_params()
        .iter()
        .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
        .collect();
    for (k, v) in over {
        pv.insert(k.to_string(), *v);
    }
    pv
}

#[allow(clippy::too_many_arguments)]
fn merge_full(
    name: &str,
    shape: &[usize],
    dt: DType,
    inputs: &[&[f32]],
    base: Option<usize>,
    global: Kv,
    models: &[Kv],
    seed: u64,
) -> smelt_core::Result<Tensor> {
    assert_eq!(inputs.len(), models.len());
    let m = method(name);
    let g = globals(m.as_ref(), global);
    let pm: Vec<ParamValues> = models.iter().map(|o| model_values(m.as_ref(), o)).collect();
    let tensors = inputs
        .iter()
        .map(|x| Tensor::new(shape.to_vec(), x.to_vec(), dt))
        .collect();
    m.merge(MergeJob {
        name: "model.layers.0.mlp.up_proj.weight",
        tensors,
        base,
        global: &g,
        per_model: pm.iter().collect(),
        is_embed: false,
        seed,
    })
}

/// f32 merge, seed 0; panics on error.
fn merge(
    name: &str,
    shape: &[usize],
    inputs: &[&[f32]],
    base: Option<usize>,
    global: Kv,
    models: &[Kv],
) -> Vec<f32> {
    let out = merge_full(name, shape, DType::F32, inputs, base, global, models, 0)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(out.shape, shape, "{name}: output shape");
    out.data
}

/// Runs `validate` with planner-style parameter maps.
fn validate(
    name: &str,
    global: Kv,
    models: &[Kv],
    base: Option<usize>,
    numel: usize,
) -> Result<Vec<String>, String> {
    let m = method(name);
    let g = globals(m.as_ref(), global);
    let pm: Vec<ParamValues> = models.iter().map(|o| model_values(m.as_ref(), o)).collect();
    let is_base: Vec<bool> = (0..models.len()).map(|i| Some(i) == base).collect();
    let labels: Vec<String> = (0..models.len()).map(|i| format!("m{i}")).collect();
    m.validate(&ValidateCtx {
        global: &g,
        per_model: &pm,
        is_base: &is_base,
        labels: &labels,
        numel,
    })
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= tol,
            "element {i}: got {g}, want {w} (got {got:?}, want {want:?})"
        );
    }
}

/// Independent bfloat16 rounding (round to nearest, ties to even) via `half`.
fn bf(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

const W1: Kv = &[("weight", 1.0)];
const BASE: Kv = &[];
const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;

// ---------------------------------------------------------------------------
// multislerp (§4.4)
// ---------------------------------------------------------------------------

#[test]
fn multislerp_orthogonal_no_base() {
    // x0 = (3,0), x1 = (0,4); weights 1, 3 → normalised 0.25, 0.75.
    // m = 0.25·(1,0) + 0.75·(0,1) = (0.25, 0.75), m̂ = (1,3)/√10. The weighted
    // tangent Σ w_i (u_i − (u_i·m̂) m̂) = m − |m| m̂ = 0, so ν = eps and the
    // result is m̂ · (0.25·3 + 0.75·4) = 3.75·(1,3)/√10.
    let out = merge(
        "multislerp",
        &[2],
        &[&[3.0, 0.0], &[0.0, 4.0]],
        None,
        &[],
        &[&[("weight", 1.0)], &[("weight", 3.0)]],
    );
    let s = 3.75 / 10f64.sqrt();
    assert_close(&out, &[s, 3.0 * s], 1e-5);

    // Same without weight normalisation: m = (1,3), result 15·(1,3)/√10.
    let out = merge(
        "multislerp",
        &[2],
        &[&[3.0, 0.0], &[0.0, 4.0]],
        None,
        &[("normalize_weights", 0.0)],
        &[&[("weight", 1.0)], &[("weight", 3.0)]],
    );
    let s = 15.0 / 10f64.sqrt();
    assert_close(&out, &[s, 3.0 * s], 1e-5);

    // Equal weights: normalised midpoint (1,1)/√2 times mean norm 3.5.
    let out = merge(
        "multislerp",
        &[2],
        &[&[3.0, 0.0], &[0.0, 4.0]],
        None,
        &[],
        &[W1, W1],
    );
    assert_close(&out, &[3.5 * SQRT_HALF, 3.5 * SQRT_HALF], 1e-5);
}

#[test]
fn multislerp_with_base_works_on_task_vectors() {
    // base (1,1); deltas (3,0) and (0,4) as above, then the base is added.
    let out = merge(
        "multislerp",
        &[2],
        &[&[1.0, 1.0], &[4.0, 1.0], &[1.0, 5.0]],
        Some(0),
        &[],
        &[BASE, &[("weight", 1.0)], &[("weight", 3.0)]],
    );
    let s = 3.75 / 10f64.sqrt();
    assert_close(&out, &[1.0 + s, 1.0 + 3.0 * s], 1e-5);
}

#[test]
fn multislerp_antipodal_two_models_falls_back_to_linear() {
    // (2,4) and (−1,−2): unit vectors are exact negatives (‖(2,4)‖ = 2‖(1,2)‖
    // exactly in binary), so with equal weights m = 0 → 0.5·x0 + 0.5·x1.
    let out = merge(
        "multislerp",
        &[2],
        &[&[2.0, 4.0], &[-1.0, -2.0]],
        None,
        &[],
        &[W1, W1],
    );
    assert_eq!(out, vec![0.5, 1.0]);
    // With a base (1,1): the same deltas, then + base.
    let out = merge(
        "multislerp",
        &[2],
        &[&[3.0, 5.0], &[1.0, 1.0], &[0.0, -1.0]],
        Some(1),
        &[],
        &[W1, BASE, W1],
    );
    assert_eq!(out, vec![1.5, 2.0]);
}

#[test]
fn multislerp_antipodal_three_models_is_an_error() {
    // (1,0), (−1,0), (0,0) with weights 1/3 each: m = 0 exactly → error.
    let r = merge_full(
        "multislerp",
        &[2],
        DType::F32,
        &[&[1.0, 0.0], &[-1.0, 0.0], &[0.0, 0.0]],
        None,
        &[],
        &[W1, W1, W1],
        0,
    );
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn multislerp_single_non_base_model_returned_as_is() {
    // The base is not added back: the model's tensor comes out unchanged.
    let out = merge(
        "multislerp",
        &[3],
        &[&[1.0, 1.0, 1.0], &[5.0, 7.0, -2.0]],
        Some(0),
        &[],
        &[BASE, &[("weight", 0.3)]],
    );
    assert_eq!(out, vec![5.0, 7.0, -2.0]);
}

// ---------------------------------------------------------------------------
// karcher (§4.5)
// ---------------------------------------------------------------------------

#[test]
fn karcher_orthogonal_unit_vectors_give_normalised_midpoint() {
    // Initial u = (1,1)/√2 already balances the two log maps: T = 0.
    let out = merge(
        "karcher",
        &[4],
        &[&[1.0, 0.0, 0.0, 0.0], &[0.0, 1.0, 0.0, 0.0]],
        None,
        &[],
        &[BASE, BASE],
    );
    assert_close(&out, &[SQRT_HALF, SQRT_HALF, 0.0, 0.0], 1e-6);
    // Norms 3 and 4: same direction, scaled by the mean norm 3.5.
    let out = merge(
        "karcher",
        &[2],
        &[&[3.0, 0.0], &[0.0, 4.0]],
        None,
        &[],
        &[BASE, BASE],
    );
    assert_close(&out, &[3.5 * SQRT_HALF, 3.5 * SQRT_HALF], 1e-5);
}

#[test]
fn karcher_identical_inputs_return_that_input() {
    let x: &[f32] = &[1.0, 2.0, 2.0];
    let out = merge("karcher", &[3], &[x, x], None, &[], &[BASE, BASE]);
    assert_close(&out, &[1.0, 2.0, 2.0], 1e-5);
}

#[test]
fn karcher_max_iter_zero_is_the_normalised_chordal_mean() {
    // Unit vectors at angles 0°, 0°, 90°: the chordal mean (2,1)/3 normalised is
    // (2,1)/√5 (26.57°); the Karcher mean on the circle is the angle mean, 30°.
    let inputs: &[&[f32]] = &[&[1.0, 0.0], &[1.0, 0.0], &[0.0, 1.0]];
    let models: &[Kv] = &[BASE, BASE, BASE];
    let out = merge("karcher", &[2], inputs, None, &[("max_iter", 0.0)], models);
    let s5 = 5f64.sqrt();
    assert_close(&out, &[2.0 / s5, 1.0 / s5], 1e-6);
    // With the default 10 iterations it reaches 30° (one exact step on a circle).
    let out = merge("karcher", &[2], inputs, None, &[], models);
    let a = std::f64::consts::PI / 6.0;
    assert_close(&out, &[a.cos(), a.sin()], 1e-5);
}

// ---------------------------------------------------------------------------
// sce (§4.8)
// ---------------------------------------------------------------------------

const SCE_BASE: &[f32] = &[0.5, 0.5, 0.5, 0.5];
// task vectors T1 = (4,1,1,0), T2 = (2,1,−1,0), T3 = (0,2,0,6)
const SCE_X1: &[f32] = &[4.5, 1.5, 1.5, 0.5];
const SCE_X2: &[f32] = &[2.5, 1.5, -0.5, 0.5];
const SCE_X3: &[f32] = &[0.5, 2.5, 0.5, 6.5];

fn sce(topk: f64) -> Vec<f32> {
    merge(
        "sce",
        &[4],
        &[SCE_BASE, SCE_X1, SCE_X2, SCE_X3],
        Some(0),
        &[("select_topk", topk)],
        &[BASE, BASE, BASE, BASE],
    )
}

#[test]
fn sce_without_selection() {
    // s = mean(T²) = (18/4, 6/4, 40/4) → ω = (4.5, 1.5, 10)/16.
    // pos0: sum 6 ≥ 0; T1, T2 agree → (4·4.5 + 2·1.5)/(4.5 + 1.5) = 3.5
    // pos1: all agree → (4.5 + 1.5 + 2·10)/16 = 1.625
    // pos2: sum 0 counts positive → T2 (−1) erased, T3 (0) never selected → 1
    // pos3: only T3 → 6
    let out = sce(1.0);
    assert_close(&out, &[4.0, 2.125, 1.5, 6.5], 1e-6);
}

#[test]
fn sce_select_topk_half() {
    // population variances: pos0 8/3, pos1 2/9, pos2 2/3, pos3 8; nz = 4,
    // k = floor(4·0.5) = 2 → keep pos3 and pos0.
    // masked T1 = (4,0,0,0), T2 = (2,0,0,0), T3 = (0,0,0,6):
    // s = (4, 1, 9) → ω = (4, 1, 9)/14.
    // pos0: (4·4 + 2·1)/14 ÷ 5/14 = 18/5 = 3.6; pos3: 6; others: base.
    let out = sce(0.5);
    assert_close(&out, &[4.1, 0.5, 0.5, 6.5], 1e-6);
}

#[test]
fn sce_select_topk_zero_erases_everything() {
    assert_eq!(sce(0.0), SCE_BASE.to_vec());
}

// ---------------------------------------------------------------------------
// ram / ramplus_tl (§4.9)
// ---------------------------------------------------------------------------

#[test]
fn ram_unique_shared_and_epsilon() {
    // base 1; T1 = (1, 2, 0, ~9.5e-7), T2 = (0, 4, 3, 0).
    let base: &[f32] = &[1.0, 1.0, 1.0, 1.0];
    let x1: &[f32] = &[2.0, 3.0, 1.0, 1.000_001];
    let x2: &[f32] = &[1.0, 5.0, 4.0, 1.0];
    // epsilon 1e-5: pos0 unique → 1; pos1 shared → (2+4)/2 = 3; pos2 unique →
    // 3; pos3 below epsilon → base.
    let out = merge("ram", &[4], &[base, x1, x2], Some(0), &[], &[BASE; 3]);
    assert_eq!(out, vec![2.0, 4.0, 4.0, 1.0]);
    // epsilon 2.5: only |T| > 2.5 is active; pos1 becomes T2's unique 4.
    let out = merge(
        "ram",
        &[4],
        &[base, x1, x2],
        Some(0),
        &[("epsilon", 2.5)],
        &[BASE; 3],
    );
    assert_eq!(out, vec![1.0, 5.0, 4.0, 1.0]);
}

#[test]
fn ramplus_tl_boosts_unique_contributions() {
    // T1 = (1,2,0,0): shared 1, unique 1 → ρ1 = 1.
    // T2 = (0,4,3,5): shared 1, unique 2 → ρ2 = 0.5.
    let base: &[f32] = &[1.0, 1.0, 1.0, 1.0];
    let x1: &[f32] = &[2.0, 3.0, 1.0, 1.0];
    let x2: &[f32] = &[1.0, 5.0, 4.0, 6.0];
    // defaults r = 0.1, alpha = 0.2: both clamp to 0.2 → λ = 1.02.
    let out = merge(
        "ramplus_tl",
        &[4],
        &[base, x1, x2],
        Some(0),
        &[],
        &[BASE; 3],
    );
    assert_close(&out, &[2.02, 4.0, 1.0 + 3.06, 1.0 + 5.1], 1e-6);
    // r = 0.5, alpha = 1: λ1 = 1.5, λ2 = 1.25.
    let out = merge(
        "ramplus_tl",
        &[4],
        &[base, x1, x2],
        Some(0),
        &[("r", 0.5), ("alpha", 1.0)],
        &[BASE; 3],
    );
    assert_close(&out, &[2.5, 4.0, 4.75, 7.25], 1e-6);
}

#[test]
fn ramplus_tl_outputs_f32() {
    let rp = method("ramplus_tl");
    assert_eq!(rp.output_dtype(DType::BF16), DType::F32);
    assert_eq!(rp.output_dtype(DType::F16), DType::F32);
    assert_eq!(method("ram").output_dtype(DType::BF16), DType::BF16);
    // bf16 inputs: T1 = (1,2,0) (ρ1 = 1), T2 = (0,2,0) (no unique: ρ2 huge);
    // r = 0.5, alpha = 0.2 → λ1 = 1.1 (float32). The unique contribution
    // 1·λ1 and base + it are f32: 2.1, not bf16's 2.09375.
    let out = merge_full(
        "ramplus_tl",
        &[3],
        DType::BF16,
        &[&[1.0, 1.0, 1.0], &[2.0, 3.0, 1.0], &[1.0, 3.0, 1.0]],
        Some(0),
        &[("r", 0.5)],
        &[BASE; 3],
        0,
    )
    .unwrap();
    assert_eq!(out.dtype, DType::F32);
    assert_close(&out.data, &[2.1, 3.0, 1.0], 1e-6);
    assert_ne!(out.data[0], bf(2.1));
}

// ---------------------------------------------------------------------------
// model_stock (§4.10)
// ---------------------------------------------------------------------------

#[test]
fn model_stock_orthogonal_offsets_give_base() {
    // o1 = (2,0,0,0), o2 = (0,3,0,0): c = 0 → t = 0 → base exactly.
    let base: &[f32] = &[1.0, 2.0, 3.0, 4.0];
    let out = merge(
        "model_stock",
        &[4],
        &[base, &[3.0, 2.0, 3.0, 4.0], &[1.0, 5.0, 3.0, 4.0]],
        Some(0),
        &[],
        &[BASE; 3],
    );
    assert_eq!(out, base.to_vec());
}

#[test]
fn model_stock_parallel_offsets_give_average() {
    // o1 = (1,2,2,0), o2 = (2,4,4,0): c = 18/(3·6) = 1 → t = 1 → average.
    let out = merge(
        "model_stock",
        &[4],
        &[
            &[1.0, 1.0, 1.0, 1.0],
            &[2.0, 3.0, 3.0, 1.0],
            &[3.0, 5.0, 5.0, 1.0],
        ],
        Some(0),
        &[],
        &[BASE; 3],
    );
    assert_close(&out, &[2.5, 4.0, 4.0, 1.0], 1e-6);
}

#[test]
fn model_stock_known_cosines() {
    // o1 = (1,1,0,0), o2 = (1,0,1,0): c = 1/2 → t = 2·½/(1 + ½) = 2/3.
    let out = merge(
        "model_stock",
        &[4],
        &[
            &[1.0, 1.0, 1.0, 1.0],
            &[2.0, 2.0, 1.0, 1.0],
            &[2.0, 1.0, 2.0, 1.0],
        ],
        Some(0),
        &[],
        &[BASE; 3],
    );
    // avg = (2, 1.5, 1.5, 1); t·avg + (1−t)·1
    let t = 2.0 / 3.0;
    let want: Vec<f64> = [2.0, 1.5, 1.5, 1.0]
        .iter()
        .map(|a| t * a + (1.0 - t))
        .collect();
    assert_close(&out, &want, 1e-5);

    // Three fine-tunes: o1 = e1, o2 = e2, o3 = e1 + e2 → cosines 0, 1/√2, 1/√2;
    // c = √2/3, t = 3c/(1 + 2c).
    let out = merge(
        "model_stock",
        &[2],
        &[&[0.0, 0.0], &[1.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]],
        Some(0),
        &[],
        &[BASE; 4],
    );
    let c = 2f64.sqrt() / 3.0;
    let t = 3.0 * c / (1.0 + 2.0 * c);
    assert_close(&out, &[t * 2.0 / 3.0, t * 2.0 / 3.0], 1e-5);
}

#[test]
fn model_stock_filter_wise_per_row() {
    // 2×2, base all ones. Row 0 offsets (1,0) ⟂ (0,2) → t = 0 → base row.
    // Row 1 offsets (1,2) ∥ (2,4) → t = 1 → average row (2.5, 4).
    let inputs: &[&[f32]] = &[
        &[1.0, 1.0, 1.0, 1.0],
        &[2.0, 1.0, 2.0, 3.0],
        &[1.0, 3.0, 3.0, 5.0],
    ];
    let out = merge(
        "model_stock",
        &[2, 2],
        inputs,
        Some(0),
        &[("filter_wise", 1.0)],
        &[BASE; 3],
    );
    assert_close(&out, &[1.0, 1.0, 2.5, 4.0], 1e-6);
    // Flattened: o1 = (1,0,1,2), o2 = (0,2,2,4): dot 10, norms √6·√24 = 12,
    // c = 5/6, t = (10/6)/(11/6) = 10/11.
    let out = merge("model_stock", &[2, 2], inputs, Some(0), &[], &[BASE; 3]);
    let t = 10.0 / 11.0;
    let want: Vec<f64> = [1.5, 2.0, 2.5, 4.0]
        .iter()
        .map(|a| t * a + (1.0 - t))
        .collect();
    assert_close(&out, &want, 1e-5);
}

// ---------------------------------------------------------------------------
// nearswap (§4.11)
// ---------------------------------------------------------------------------

#[test]
fn nearswap_swaps_close_and_interpolates_far() {
    // t = 0.125. pos0 |a−b| = 0.0625 < t → b. pos1 |a−b| = 0.5 → w = 0.25:
    // 0.25·2.5 + 0.75·2 = 2.125. pos2 |a−b| = 2 → w = 1/16:
    // 1/16 + 15/16·3 = 2.875. pos3 equal → b.
    let out = merge(
        "nearswap",
        &[4],
        &[&[1.0, 2.0, 3.0, 4.0], &[1.0625, 2.5, 1.0, 4.0]],
        Some(0),
        &[("t", 0.125)],
        &[BASE, BASE],
    );
    assert_eq!(out, vec![1.0625, 2.125, 2.875, 4.0]);
}

#[test]
fn nearswap_bf16_rounds_every_op() {
    // a = 3, b = 1, t = 0.3: w = bf(0.3/2) = 0.150390625; 1 − w = 0.849609375
    // → bf 0.8515625 (tie to even); ·3 = 2.5546875 → 2.5625; + w = 2.712890625
    // → 2.71875. A single final rounding of 0.15·1 + 0.85·3 = 2.7 gives 2.703125.
    let a: [f32; 4] = [3.0, 1.0, 2.0, 5.0];
    let b: [f32; 4] = [1.0, 1.5, 2.0078125, 7.0];
    let t = 0.3f32;
    let out = merge_full(
        "nearswap",
        &[4],
        DType::BF16,
        &[&a, &b],
        Some(0),
        &[("t", 0.3)],
        &[BASE, BASE],
        0,
    )
    .unwrap();
    assert_eq!(out.dtype, DType::BF16);
    let want: Vec<f32> = (0..4)
        .map(|i| {
            let d = bf(bf(a[i] - b[i]).abs()).max(bf(1e-6));
            let w = bf(t / d).clamp(0.0, 1.0);
            bf(bf(w * b[i]) + bf(bf(1.0 - w) * a[i]))
        })
        .collect();
    assert_eq!(want[0], 2.71875);
    assert_eq!(out.data, want);
}

// ---------------------------------------------------------------------------
// arcee_fusion (§4.12)
// ---------------------------------------------------------------------------

#[test]
fn arcee_fusion_keeps_only_the_outlier() {
    // 1-D: one KL value k > 0 for the whole tensor, imp = |b − a|·k.
    // |Δ| = 0.1..0.7 and 5: sorted indices trunc(q·7) = 1, 3, 5 →
    // q1 = 0.2k, median = 0.4k, q3 = 0.6k, thr = (0.4 + 1.5·0.4)k = 1.0k:
    // only the last element passes.
    let a: &[f32] = &[1.0; 8];
    let b: &[f32] = &[1.1, 0.8, 1.3, 0.6, 1.5, 0.4, 1.7, -4.0];
    let m = method("arcee_fusion");
    assert_eq!(m.output_dtype(DType::BF16), DType::F32);
    let out = merge("arcee_fusion", &[8], &[a, b], Some(0), &[], &[BASE, BASE]);
    assert_eq!(out, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -4.0]);
}

#[test]
fn arcee_fusion_zero_threshold_takes_every_change() {
    // Row 0 is shifted by a constant (softmax unchanged → KL 0 → imp 0); row 1
    // changes one element. Seven of eight importances are 0, so q1 = median =
    // q3 = 0, thr = 0, and imp ≥ 0 holds everywhere: the result is b.
    let a: &[f32] = &[0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0];
    let b: &[f32] = &[3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 2.0];
    let out = merge(
        "arcee_fusion",
        &[2, 4],
        &[a, b],
        Some(0),
        &[],
        &[BASE, BASE],
    );
    assert_eq!(out, b.to_vec());
}

// ---------------------------------------------------------------------------
// breadcrumbs (§4.7 magnitude_outliers)
// ---------------------------------------------------------------------------

const BC_DELTA: &[f32] = &[5.0, -8.0, 1.0, 7.0, -3.0, 2.0, -6.0, 4.0];

fn breadcrumbs(name: &str, density: f64, gamma: Option<f64>) -> Vec<f32> {
    let zero = [0.0f32; 8];
    let mut pm = vec![("weight", 1.0), ("density", density)];
    if let Some(g) = gamma {
        pm.push(("gamma", g));
    }
    merge(name, &[8], &[&zero, BC_DELTA], Some(0), &[], &[BASE, &pm])
}

#[test]
fn breadcrumbs_counts() {
    // n = 8, density 0.5, gamma 0.125: keep 4, top 1, bot 3 → drop |Δ| 1, 2, 3
    // and 8; keep 4, 5, 6, 7.
    assert_eq!(
        breadcrumbs("breadcrumbs", 0.5, Some(0.125)),
        vec![5.0, 0.0, 0.0, 7.0, 0.0, 0.0, -6.0, 4.0]
    );
    // density 0.9, gamma 0.25: keep 7, top 2, bot −1 → top 1, bot 0: only the
    // largest magnitude (8) is dropped.
    assert_eq!(
        breadcrumbs("breadcrumbs", 0.9, Some(0.25)),
        vec![5.0, 0.0, 1.0, 7.0, -3.0, 2.0, -6.0, 4.0]
    );
    // density 0.25, gamma 0.25: keep 2, top 2, bot 4 → keep 5 and 6.
    assert_eq!(
        breadcrumbs("breadcrumbs", 0.25, Some(0.25)),
        vec![5.0, 0.0, 0.0, 0.0, 0.0, 0.0, -6.0, 0.0]
    );
    // breadcrumbs_ties, one model: consensus keeps every non-zero survivor.
    assert_eq!(
        breadcrumbs("breadcrumbs_ties", 0.5, Some(0.125)),
        vec![5.0, 0.0, 0.0, 7.0, 0.0, 0.0, -6.0, 4.0]
    );
}

#[test]
fn breadcrumbs_gamma_times_n_below_one_keeps_the_largest() {
    // Default gamma 0.01: top = floor(0.08) = 0, bot = 4 → mergekit 0.1.5
    // keeps sorted[4:8], the four largest magnitudes (its own output for
    // this Δ: [5, -8, 0, 7, -0, 0, -6, 0]; the spec read `sorted[bot:-0]`,
    // an empty slice that zeroed everything).
    let largest4 = vec![5.0, -8.0, 0.0, 7.0, 0.0, 0.0, -6.0, 0.0];
    assert_eq!(breadcrumbs("breadcrumbs", 0.5, None), largest4);
    assert_eq!(breadcrumbs("breadcrumbs", 0.5, Some(0.1)), largest4);
    // density 1 (the default) prunes nothing at all.
    assert_eq!(breadcrumbs("breadcrumbs", 1.0, None), BC_DELTA.to_vec());
}

// ---------------------------------------------------------------------------
// task-arithmetic family: task_arithmetic, dare_*, ties, della (§4.6, §4.7)
// ---------------------------------------------------------------------------

// base 1; Δ1 = (1,−1,2,0) with weight 1, Δ2 = (0,2,−1,1) with weight 0.5.
const TA_BASE: &[f32] = &[1.0, 1.0, 1.0, 1.0];
const TA_X1: &[f32] = &[2.0, 0.0, 3.0, 1.0];
const TA_X2: &[f32] = &[1.0, 3.0, 0.0, 2.0];

fn ta(name: &str, global: Kv, density: f64) -> Vec<f32> {
    merge(
        name,
        &[4],
        &[TA_X1, TA_BASE, TA_X2],
        Some(1),
        global,
        &[
            &[("weight", 1.0), ("density", density)],
            BASE,
            &[("weight", 0.5), ("density", density)],
        ],
    )
}

#[test]
fn task_arithmetic_with_lambda() {
    // Σ w·Δ = (1, 0, 1.5, 0.5)
    assert_eq!(ta("task_arithmetic", &[], 1.0), vec![2.0, 1.0, 2.5, 1.5]);
    assert_eq!(
        ta("task_arithmetic", &[("lambda", 2.0)], 1.0),
        vec![3.0, 1.0, 4.0, 2.0]
    );
    // normalize: ÷ 1.5, then · lambda 3 → 2·(1, 0, 1.5, 0.5)
    assert_close(
        &ta(
            "task_arithmetic",
            &[("normalize", 1.0), ("lambda", 3.0)],
            1.0,
        ),
        &[3.0, 1.0, 4.0, 2.0],
        1e-6,
    );
}

#[test]
fn ties_and_dare_ties_density_one() {
    // W1 = (1,−1,2,0), W2 = (0,1,−0.5,0.5); ΣW = (1,0,1.5,0.5) → all majority +.
    // kept: pos0 W1 (w 1); pos1 W2 (w 0.5); pos2 W1 (w 1); pos3 W2 (w 0.5).
    // mixed = (1, 1, 2, 0.5); ties normalises by (1, 0.5, 1, 0.5) → (1, 2, 2, 1).
    assert_eq!(ta("ties", &[], 1.0), vec![2.0, 3.0, 3.0, 2.0]);
    // dare_ties (normalize false by default) with density 1: no pruning.
    assert_eq!(ta("dare_ties", &[], 1.0), vec![2.0, 2.0, 3.0, 1.5]);
    assert_eq!(
        ta("dare_ties", &[], 1.0),
        ta("ties", &[("normalize", 0.0)], 1.0)
    );
    assert_eq!(
        ta("dare_ties", &[("normalize", 1.0)], 1.0),
        ta("ties", &[], 1.0)
    );
}

#[test]
fn ties_keeps_at_least_one_element() {
    // density 0.1 of 4 elements: floor(0.4) = 0, and mergekit 0.1.5 keeps
    // max(1, 0) = 1 — the largest |Δ| of each model: Δ1 keeps 2 (index 2),
    // Δ2 keeps 2 (index 1, weighted 1); each position has one agreeing
    // model, normalised by its weight → base + (0, 2, 2, 0).
    assert_eq!(ta("ties", &[], 0.1), vec![1.0, 3.0, 3.0, 1.0]);
}

#[test]
fn dare_linear_density_one_is_task_arithmetic() {
    assert_eq!(ta("dare_linear", &[], 1.0), vec![2.0, 1.0, 2.5, 1.5]);
    assert_eq!(ta("dare_linear", &[], 1.0), ta("task_arithmetic", &[], 1.0));
    assert_eq!(
        ta("dare_linear", &[("lambda", 2.0)], 1.0),
        ta("task_arithmetic", &[("lambda", 2.0)], 1.0)
    );
}

#[test]
fn dare_density_half_preserves_l1_for_one_model() {
    // One model, weight 1, base 0.5: Δ = (1, −2, 3, −4, 5, −6, 7, −8), Σ|Δ| = 36.
    // Every kept element is Δ_i·(36/Σ_kept|Δ|); dropped ones are 0.
    let base = [0.5f32; 8];
    let delta: [f32; 8] = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0];
    let x: Vec<f32> = base.iter().zip(&delta).map(|(b, d)| b + d).collect();
    for name in ["dare_linear", "dare_ties"] {
        let mut partial = 0;
        for seed in 0..16 {
            let out = merge_full(
                name,
                &[8],
                DType::F32,
                &[&base, &x],
                Some(0),
                &[],
                &[BASE, &[("weight", 1.0), ("density", 0.5)]],
                seed,
            )
            .unwrap()
            .data;
            let m: Vec<f64> = out.iter().zip(&base).map(|(o, b)| (o - b) as f64).collect();
            let kept: Vec<usize> = (0..8).filter(|i| m[*i] != 0.0).collect();
            if kept.is_empty() {
                continue;
            }
            if kept.len() < 8 {
                partial += 1;
            }
            let kept_l1: f64 = kept.iter().map(|i| delta[*i].abs() as f64).sum();
            let ratio = 36.0 / kept_l1;
            for i in 0..8 {
                let want = if kept.contains(&i) {
                    delta[i] as f64 * ratio
                } else {
                    0.0
                };
                assert!(
                    (m[i] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{name} seed {seed}: element {i} {} vs {want} ({out:?})",
                    m[i]
                );
            }
            let l1: f64 = m.iter().map(|v| v.abs()).sum();
            assert!((l1 - 36.0).abs() < 1e-4, "{name} seed {seed}: L1 {l1}");
        }
        assert!(partial > 0, "{name}: no seed pruned part of the tensor");
    }
}

#[test]
fn della_density_one_prunes_nothing() {
    // della = magprune + sign consensus, normalize and rescale on: with density
    // 1 it is ties; della_linear is task_arithmetic.
    assert_eq!(ta("della", &[], 1.0), vec![2.0, 3.0, 3.0, 2.0]);
    assert_eq!(ta("della", &[], 1.0), ta("ties", &[], 1.0));
    assert_eq!(ta("della_linear", &[], 1.0), vec![2.0, 1.0, 2.5, 1.5]);
    // One model, weight 1: the model itself.
    let out = merge(
        "della",
        &[4],
        &[TA_BASE, TA_X1],
        Some(0),
        &[],
        &[BASE, &[("weight", 1.0), ("density", 1.0), ("epsilon", 0.5)]],
    );
    assert_eq!(out, TA_X1.to_vec());
}

#[test]
fn della_epsilon_validation() {
    let v = |density: f64, eps: f64| {
        validate(
            "della",
            &[],
            &[
                BASE,
                &[("weight", 1.0), ("density", density), ("epsilon", eps)],
            ],
            Some(0),
            8,
        )
    };
    assert!(v(0.5, 0.15).is_ok());
    assert!(v(0.5, 0.6).is_err()); // density − ε < 0
    assert!(v(0.9, 0.15).is_err()); // density + ε = 1.05 ≥ 1
    assert!(v(0.15, 0.15).is_err()); // density − ε = 0 is not > 0
    assert!(v(1.0, 0.6).is_ok()); // density 1: no pruning, ε unused
    // The default ε 0.15 applies when none is given.
    let r = validate(
        "della_linear",
        &[],
        &[BASE, &[("weight", 1.0), ("density", 0.1)]],
        Some(0),
        8,
    );
    assert!(r.is_err(), "{r:?}");
    // merge itself refuses too.
    let r = merge_full(
        "della",
        &[4],
        DType::F32,
        &[TA_BASE, TA_X1],
        Some(0),
        &[],
        &[BASE, &[("weight", 1.0), ("density", 0.5), ("epsilon", 0.6)]],
        0,
    );
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn task_arithmetic_bf16_rounds_every_op() {
    // bf16 weights 0.3 → 0.30078125 and 0.7 → 0.69921875; products rounded,
    // their sum accumulated in f32 and rounded once, lambda product rounded,
    // base add rounded.
    let base: [f32; 4] = [1.0, 2.0, -3.0, 1.0];
    let x1: [f32; 4] = [2.0, 3.0, -2.0, 1.5];
    let x2: [f32; 4] = [-1.0, 1.0, -3.5, 1.125];
    let (w1, w2, lambda) = (0.3f64, 0.7f64, 0.9f64);
    let out = merge_full(
        "task_arithmetic",
        &[4],
        DType::BF16,
        &[&base, &x1, &x2],
        Some(0),
        &[("lambda", lambda)],
        &[BASE, &[("weight", w1)], &[("weight", w2)]],
        0,
    )
    .unwrap();
    assert_eq!(out.dtype, DType::BF16);
    let (bw1, bw2) = (bf(w1 as f32), bf(w2 as f32));
    assert_eq!((bw1, bw2), (0.30078125, 0.69921875));
    let want: Vec<f32> = (0..4)
        .map(|i| {
            let d1 = bf(x1[i] - base[i]);
            let d2 = bf(x2[i] - base[i]);
            let mixed = bf(bf(bw1 * d1) + bf(bw2 * d2));
            let mixed = bf(mixed * lambda as f32);
            bf(base[i] + mixed)
        })
        .collect();
    assert_eq!(out.data, want);
    // pos0 by hand: Δ = (1, −2); 0.30078125 − 1.3984375 = −1.09765625 → bf16
    // −1.09375 (tie to even); · 0.9 = −0.984375 (exact); 1 − 0.984375 =
    // 0.015625. One rounding of 1 + 0.9·(0.3 − 1.4) = 0.01 gives 0.010009765625.
    assert_eq!(out.data[0], 0.015625);
    let once = bf(1.0 + 0.9 * (0.3 * 1.0 + 0.7 * -2.0));
    assert_eq!(once, 41.0 / 4096.0); // 0.010009765625
    assert_ne!(out.data[0], once, "{:?}", out.data);
}

// ---------------------------------------------------------------------------
// passthrough (§4.13)
// ---------------------------------------------------------------------------

#[test]
fn passthrough_with_and_without_scale() {
    let x: &[f32] = &[1.0, -2.0, 3.0];
    assert_eq!(
        merge("passthrough", &[3], &[x], None, &[], &[&[("scale", 0.5)]]),
        vec![0.5, -1.0, 1.5]
    );
    assert_eq!(
        merge("passthrough", &[3], &[x], None, &[], &[BASE]),
        x.to_vec()
    );
    let r = merge_full(
        "passthrough",
        &[3],
        DType::F32,
        &[x, x],
        None,
        &[],
        &[BASE, BASE],
        0,
    );
    assert!(r.is_err());
}

// ---------------------------------------------------------------------------
// slerp (§4.2)
// ---------------------------------------------------------------------------

#[test]
fn slerp_endpoints_are_exact() {
    // base is input 1 (v0); input 0 is v1.
    let v1: &[f32] = &[0.3, -1.7, 2.2, 0.9];
    let v0: &[f32] = &[1.1, 0.4, -0.6, 2.5];
    let s = |t: f64| {
        merge(
            "slerp",
            &[4],
            &[v1, v0],
            Some(1),
            &[("t", t)],
            &[BASE, BASE],
        )
    };
    assert_eq!(s(0.0), v0.to_vec());
    assert_eq!(s(1.0), v1.to_vec());
}

#[test]
fn slerp_orthogonal_halfway_and_lerp_fallback() {
    // θ = π/2: coefficients sin(π/4)/1 each, applied to the un-normalised inputs.
    let out = merge(
        "slerp",
        &[2],
        &[&[3.0, 0.0], &[0.0, 4.0]],
        Some(0),
        &[("t", 0.5)],
        &[BASE, BASE],
    );
    assert_close(&out, &[3.0 * SQRT_HALF, 4.0 * SQRT_HALF], 1e-6);
    // Parallel inputs (|cos| > 0.9995): plain lerp, 0.75·(1,2) + 0.25·(2,4).
    let out = merge(
        "slerp",
        &[2],
        &[&[1.0, 2.0], &[2.0, 4.0]],
        Some(0),
        &[("t", 0.25)],
        &[BASE, BASE],
    );
    assert_close(&out, &[1.25, 2.5], 1e-6);
}

// ---------------------------------------------------------------------------
// nuslerp (§4.3)
// ---------------------------------------------------------------------------

// v0 = [[1,0],[1,0]], v1 = [[0,1],[1,0]]
const NU_V0: &[f32] = &[1.0, 0.0, 1.0, 0.0];
const NU_V1: &[f32] = &[0.0, 1.0, 1.0, 0.0];

fn nuslerp(global: Kv, w: (f64, f64)) -> Vec<f32> {
    merge(
        "nuslerp",
        &[2, 2],
        &[NU_V0, NU_V1],
        None,
        global,
        &[&[("weight", w.0)], &[("weight", w.1)]],
    )
}

#[test]
fn nuslerp_flattened() {
    // One vector: (1,0,1,0)·(0,1,1,0) / (√2·√2) = ½ → θ = π/3, sin θ = √3/2.
    // t = 0.5: sin(π/6) = ½ each → (v0 + v1)/√3.
    let s3 = 3f64.sqrt();
    assert_close(
        &nuslerp(&[], (1.0, 1.0)),
        &[1.0 / s3, 1.0 / s3, 2.0 / s3, 0.0],
        1e-6,
    );
    // t = w1/(w0 + w1) = 0.75: (sin(θ/4)·v0 + sin(3θ/4)·v1)/sin θ.
    let th = std::f64::consts::PI / 3.0;
    let (c0, c1) = ((0.25 * th).sin() / th.sin(), (0.75 * th).sin() / th.sin());
    assert_close(&nuslerp(&[], (1.0, 3.0)), &[c0, c1, c0 + c1, 0.0], 1e-6);
}

#[test]
fn nuslerp_per_row_and_row_wise() {
    let h = SQRT_HALF;
    // flatten off, row_wise off: vectors are rows.
    // row 0: (1,0) ⟂ (0,1) → (√½, √½); row 1: (1,0) = (1,0) → sin θ = 0 → lerp.
    assert_close(
        &nuslerp(&[("nuslerp_flatten", 0.0)], (1.0, 1.0)),
        &[h, h, 1.0, 0.0],
        1e-6,
    );
    // row_wise: vectors are columns.
    // col 0: (1,1) vs (0,1): θ = π/4, coefficient sin(π/8)/sin(π/4) on each →
    // k·(1,2). col 1: (0,0) vs (1,0): zero vector → cos 0 → θ = π/2 →
    // sin(π/4)·(1,0).
    let q = std::f64::consts::FRAC_PI_4;
    let k = (q / 2.0).sin() / q.sin();
    assert_close(
        &nuslerp(
            &[("nuslerp_flatten", 0.0), ("nuslerp_row_wise", 1.0)],
            (1.0, 1.0),
        ),
        &[k, h, 2.0 * k, 0.0],
        1e-6,
    );
}

#[test]
fn nuslerp_with_base_interpolates_task_vectors() {
    // base all 2, models = base + v0, base + v1 → base + flattened result.
    let base = [2.0f32; 4];
    let x0: Vec<f32> = NU_V0.iter().map(|v| v + 2.0).collect();
    let x1: Vec<f32> = NU_V1.iter().map(|v| v + 2.0).collect();
    let out = merge(
        "nuslerp",
        &[2, 2],
        &[&x0, &base, &x1],
        Some(1),
        &[],
        &[W1, BASE, W1],
    );
    let s3 = 3f64.sqrt();
    assert_close(
        &out,
        &[2.0 + 1.0 / s3, 2.0 + 1.0 / s3, 2.0 + 2.0 / s3, 2.0],
        1e-6,
    );
}

#[test]
fn karcher_zero_norm_input_still_counts_in_the_scale() {
    // (3,0) and (0,0): only the first is valid (α renormalised to 1 → u = (1,0)),
    // but the scale uses the original α: 0.5·3 + 0.5·0 = 1.5.
    let out = merge(
        "karcher",
        &[2],
        &[&[3.0, 0.0], &[0.0, 0.0]],
        None,
        &[],
        &[BASE, BASE],
    );
    assert_close(&out, &[1.5, 0.0], 1e-6);
}

#[test]
fn nuslerp_zero_weight_sum_uses_half() {
    // |w0 + w1| < 1e-6 → t = 0.5: the same as equal weights.
    assert_eq!(nuslerp(&[], (1.0, -1.0)), nuslerp(&[], (1.0, 1.0)));
}
