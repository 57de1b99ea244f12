"""Compile every Triton kernel for an H100 (sm_90) without a GPU: ``python tests/compile_kernels.py``.

The interpreter (TRITON_INTERPRET=1) runs kernels as NumPy and skips the compiler's checks
(constexpr globals, loop-carried types, layouts); this catches those on machines with no GPU.
Prints one line per compiled variant; exits non-zero on the first failure. Runs with older
Triton releases too (their ``ASTSource`` takes constants apart): that is how
``pointconv._backend.MIN_TRITON`` was found.
"""
import inspect
import os

os.environ["TRITON_INTERPRET"] = "0"  # must precede the kernels' import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pointconv.kernels import fps, gaussian, gaussian_grid, grid, gaussian_sum, gaussian_sum_double, knn, pointwise, sparse_conv, weighted_sum  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature, constexprs):
    if "constexprs" in inspect.signature(ASTSource).parameters:
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    else:  # older Triton: constants apart, arguments by name (3.2) or by position (3.0, 3.1)
        position = {name: i for i, name in enumerate(fn.arg_names)}
        by_name = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 2)
        key = (lambda n: n) if by_name else position.__getitem__
        src = ASTSource(fn=fn, signature={key(n): t for n, t in signature.items()},
                        constants={key(n): v for n, v in constexprs.items()})
    return triton.compile(src, target=TARGET, options={"enable_fp_fusion": False})


BRUTE = {"q_ptr": "*fp32", "p_ptr": "*fp32", "qlen_ptr": "*i64", "plen_ptr": "*i64", "out_d_ptr": "*fp32",
         "out_i_ptr": "*i64", "Q": "i32", "P": "i32", "radius2": "fp32"}
GRID = {"q_ptr": "*fp32", "qbatch_ptr": "*i64", "qrow_ptr": "*i64", "nq_total": "i32", "xyz_ptr": "*fp32",
        "pid_ptr": "*i64", "start_ptr": "*i64", "lo_ptr": "*fp32", "h_ptr": "*fp32", "dims_ptr": "*i64",
        "base_ptr": "*i64", "out_d_ptr": "*fp32", "out_i_ptr": "*i64", "Q": "i32", "radius2": "fp32"}
GAUSS = {"q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32", "r_ptr": "*fp32", "plen_ptr": "*i64",
         "out_m_ptr": "*fp32", "out_i_ptr": "*i64", "Q": "i32", "P": "i32"}
GAUSS_GRID = {"q_ptr": "*fp32", "qbatch_ptr": "*i64", "qrow_ptr": "*i64", "nq_total": "i32", "xyz_ptr": "*fp32",
              "pid_ptr": "*i64", "start_ptr": "*i64", "lo_ptr": "*fp32", "h_ptr": "*fp32", "dims_ptr": "*i64",
              "base_ptr": "*i64", "c_ptr": "*fp32", "margin_ptr": "*fp32", "s_ptr": "*fp32", "r_ptr": "*fp32",
              "out_m_ptr": "*fp32", "out_i_ptr": "*i64", "Q": "i32", "P": "i32"}
GAUSS_FUSED = {"q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32", "r_ptr": "*fp32", "plen_ptr": "*i64",
               "f_ptr": "*fp32", "out_m_ptr": "*fp32", "out_i_ptr": "*i64", "out_f_ptr": "*fp32", "Q": "i32", "P": "i32",
               "F": "i32"}
WSUM = {"w_ptr": "*fp32", "f_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*fp32", "Q": "i32", "C": "i32", "K": "i32"}
PDOT = {"g_ptr": "*fp32", "f_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*fp32", "Q": "i32", "C": "i32", "K": "i32"}
SEG = {"order_ptr": "*i64", "start_ptr": "*i64", "w_ptr": "*fp32", "g_ptr": "*fp32", "out_ptr": "*fp32",
       "C": "i32", "K": "i32"}
CELL = {"crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": "*fp32", "x_ptr": "*fp32", "w_ptr": "*fp32",
        "out_ptr": "*fp32", "R": "i32", "CIN": "i32", "COUT": "i32"}
CELL_WGRAD = {"crow_ptr": "*i32", "col_ptr": "*i32", "val_ptr": "*fp32", "x_ptr": "*fp32", "g_ptr": "*fp32",
              "part_ptr": "*fp32", "R": "i32", "CIN": "i32", "COUT": "i32", "blocks_per_chunk": "i32"}
GATHER_GEMM = {"table_ptr": "*i32", "rows_ptr": "*i32", "x_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "CIN": "i32",
               "COUT": "i32", "V": "i32"}
PAIR_GEMM = {"a_rows_ptr": "*i32", "b_rows_ptr": "*i32", "chunk_start_ptr": "*i64", "chunk_end_ptr": "*i64",
             "x_ptr": "*fp32", "y_ptr": "*fp32", "part_ptr": "*fp32", "CX": "i32", "CY": "i32"}
GSUM = {"q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32", "r_ptr": "*fp32", "f_ptr": "*fp32", "idx_ptr": "*i64",
        "m_ptr": "*fp32", "out_ptr": "*fp32", "Q": "i32", "P": "i32", "F": "i32", "K": "i32"}
GSUM_QUERY = {"q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32", "r_ptr": "*fp32", "f_ptr": "*fp32",
              "idx_ptr": "*i64", "w_ptr": "*fp32", "gf_ptr": "*fp32", "gw_ptr": "*fp32", "gm_ptr": "*fp32",
              "gm_out_ptr": "*fp32", "gq_ptr": "*fp32", "Q": "i32", "P": "i32", "F": "i32", "K": "i32"}
GSUM_POINT = {"order_ptr": "*i64", "start_ptr": "*i64", "q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32",
              "r_ptr": "*fp32", "w_ptr": "*fp32", "gm_ptr": "*fp32", "gf_ptr": "*fp32", "gp_ptr": "*fp32",
              "gs_ptr": "*fp32", "gr_ptr": "*fp32", "gfeat_ptr": "*fp32", "F": "i32", "K": "i32"}
GSUM_QUERY2 = dict(GSUM_QUERY, **{name: "*fp32" for name in (
    "aq_ptr", "ap_ptr", "af_ptr", "as_ptr", "ar_ptr", "wh_out_ptr", "d_q_ptr", "d_gf_ptr", "d_w_ptr", "d_gw_ptr",
    "d_gm_ptr")})
del GSUM_QUERY2["gq_ptr"]
GSUM_POINT2 = {"order_ptr": "*i64", "start_ptr": "*i64", "q_ptr": "*fp32", "p_ptr": "*fp32", "s_ptr": "*fp32",
               "r_ptr": "*fp32", "gm_ptr": "*fp32", "wh_ptr": "*fp32", "gf_ptr": "*fp32", "aq_ptr": "*fp32",
               "ap_ptr": "*fp32", "as_ptr": "*fp32", "ar_ptr": "*fp32", "d_p_ptr": "*fp32", "d_s_ptr": "*fp32",
               "d_r_ptr": "*fp32", "d_f_ptr": "*fp32", "F": "i32", "K": "i32"}
GRID_FRAME = {"p_ptr": "*fp32", "len_ptr": "*i64", "lo_ptr": "*fp32", "ext_ptr": "*fp32", "h_ptr": "*fp32",
              "dims_ptr": "*i64", "base_ptr": "*i64", "P": "i32", "C": "i32", "target": "fp32"}
GRID_KEYS = {"x_ptr": "*fp32", "len_ptr": "*i64", "lo_ptr": "*fp32", "h_ptr": "*fp32", "dims_ptr": "*i64",
             "key_ptr": "*i64", "N": "i32", "C": "i32", "n_clouds": "i32", "blocks_per_cloud": "i32"}
GRID_COUNT = {"key_ptr": "*i64", "occ_ptr": "*i32", "total": "i32", "C": "i32", "n_clouds": "i32"}
GRID_REFINE = {"len_ptr": "*i64", "ext_ptr": "*fp32", "occ_ptr": "*i32", "h_ptr": "*fp32", "dims_ptr": "*i64",
               "C": "i32", "target": "fp32"}
GAUSS_BOUNDS = {"s_ptr": "*fp32", "r_ptr": "*fp32", "len_ptr": "*i64", "lam_ptr": "*fp64", "top_ptr": "*fp64",
                "sig_ptr": "*fp64", "bad_ptr": "*i32", "P": "i32", "n_blocks": "i32"}
GAUSS_BOUNDS_FINISH = {"lam_ptr": "*fp64", "top_ptr": "*fp64", "sig_ptr": "*fp64", "bad_ptr": "*i32", "c_ptr": "*fp32",
                       "margin_ptr": "*fp32", "n_blocks": "i32", "eps": "fp32"}
FPS = {"p_ptr": "*fp32", "len_ptr": "*i64", "start_ptr": "*i64", "mind_ptr": "*fp32", "out_ptr": "*i64",
       "N": "i32", "n_samples": "i32"}


def variants():
    for k, radius, exclude in [(1, False, False), (16, True, True), (40, False, True)]:
        kp = knn._kp(k)
        bq = 32 if kp <= 32 else 16
        for d in (3, 5):
            yield "knn_brute", knn._knn_brute_kernel, BRUTE, dict(D=d, K=k, KP=kp, BQ=bq, EXCLUDE_SELF=exclude,
                                                                   USE_RADIUS=radius)
        yield "knn_grid", knn._knn_grid_kernel, GRID, dict(K=k, KP=kp, BQ=bq, EXCLUDE_SELF=exclude, USE_RADIUS=radius)
    yield "grid_frame", grid._frame_kernel, GRID_FRAME, dict(BLOCK=grid._BLOCK, AXIS_CELLS=grid._AXIS_CELLS)
    yield "grid_keys", grid._keys_kernel, GRID_KEYS, dict(BLOCK=grid._BLOCK)
    yield "grid_count", grid._count_occupied_kernel, GRID_COUNT, dict(BLOCK=grid._BLOCK)
    yield "grid_refine", grid._refine_kernel, GRID_REFINE, dict(AXIS_CELLS=grid._AXIS_CELLS)
    for d in (2, 3):
        yield "fps", fps._fps_kernel, FPS, dict(D=d, BLOCK=1024)
    yield "aniso_bounds", gaussian_grid._bounds_kernel, GAUSS_BOUNDS, dict(
        BLOCK=gaussian_grid._BOUNDS_BLOCK, SWEEPS=gaussian_grid._JACOBI_SWEEPS)
    yield "aniso_bounds_finish", gaussian_grid._finish_bounds_kernel, GAUSS_BOUNDS_FINISH, dict(BLOCK=1024)
    for k in (8, 16, 40):
        kp = knn._kp(k)
        yield "aniso_select", gaussian._aniso_select_kernel, GAUSS, dict(K=k, KP=kp, BQ=32 if kp <= 32 else 16)
        yield "aniso_grid_select", gaussian_grid._aniso_grid_select_kernel, GAUSS_GRID, dict(
            K=k, KP=kp, BQ=32 if kp <= 32 else 16)
    for k, f_type in [(16, "fp32"), (40, "bf16")]:
        kp = knn._kp(k)
        sig = dict(GAUSS_FUSED, f_ptr=f"*{f_type}")
        yield "aniso_aggregate", gaussian._aniso_aggregate_kernel, sig, dict(K=k, KP=kp, BQ=32 if kp <= 32 else 16, BF=64)
    # the Gaussian sum over given neighbors and its backward: float32 with bf16 features, float64
    for coord, feat, acc, flags in [("fp32", "bf16", tl.float32, True), ("fp64", "fp64", tl.float64, False)]:
        def typed(sig):
            return {n: t.replace("fp32", feat if n in ("f_ptr", "gf_ptr", "af_ptr") else coord) for n, t in sig.items()}
        yield "gaussian_sum", gaussian_sum._forward_kernel, typed(GSUM), dict(ACC=acc, BQ=32, BF=64)
        yield "gaussian_sum_query_grad", gaussian_sum._query_grad_kernel, typed(GSUM_QUERY), dict(
            HAS_GF=True, HAS_GW=flags, HAS_GM=flags, ACC=acc, BQ=32, BF=64)
        yield "gaussian_sum_point_grad", gaussian_sum._point_grad_kernel, typed(GSUM_POINT), dict(
            NEED_F=flags, ACC=acc, BT=32, BF=64)
        has = dict(HAS_AQ=True, HAS_AP=flags, HAS_AS=flags, HAS_AR=flags)
        yield "gaussian_sum_double_query", gaussian_sum_double._double_query_kernel, typed(GSUM_QUERY2), dict(
            K=16, KP=16, HAS_GF=True, HAS_GW=flags, HAS_GM=flags, HAS_AF=flags, **has, ACC=acc, BQ=16, BF=64)
        yield "gaussian_sum_double_point", gaussian_sum_double._double_point_kernel, typed(GSUM_POINT2), dict(
            HAS_GF=True, **has, ACC=acc, BT=32, BF=64)
    for dtype in ("fp32", "bf16"):
        half = {name: t.replace("fp32", dtype) if name in ("f_ptr", "g_ptr") else t for name, t in WSUM.items()}
        yield "gather_sum", weighted_sum._gather_sum_kernel, half, dict(BLOCK_Q=32, BLOCK_C=64)
        half = {name: t.replace("fp32", dtype) if name in ("f_ptr", "g_ptr") else t for name, t in PDOT.items()}
        yield "pair_dot", weighted_sum._pair_dot_kernel, half, dict(BLOCK_Q=32, BLOCK_C=64)
        half = {name: t.replace("fp32", dtype) if name == "g_ptr" else t for name, t in SEG.items()}
        yield "segment_sum", weighted_sum._segment_sum_kernel, half, dict(BLOCK_T=32, BLOCK_C=64)
    for index, bi, bo in [("*i32", 16, 16), ("*i64", 64, 128)]:
        wide = {name: index if name in ("crow_ptr", "col_ptr") else t for name, t in CELL.items()}
        yield "cell_conv", pointwise._cell_conv_kernel, wide, dict(BLOCK_P=32, BLOCK_I=bi, BLOCK_O=bo)
        wide = {name: index if name in ("crow_ptr", "col_ptr") else t for name, t in CELL_WGRAD.items()}
        yield "cell_weight_grad", pointwise._cell_weight_grad_kernel, wide, dict(BLOCK_P=32, BLOCK_I=bi, BLOCK_O=bo)
    # sparse conv: float32 (IEEE and TF32), float16, bfloat16 and float64 (fp64 tensor-core MMA on sm_90)
    for dtype, acc, prec, bk, bn in [("fp32", tl.float32, "ieee", 32, 64), ("fp32", tl.float32, "tf32", 16, 16),
                                     ("fp16", tl.float32, "ieee", 64, 64), ("bf16", tl.float32, "ieee", 64, 64),
                                     ("fp64", tl.float64, "ieee", 16, 32)]:
        typed = {n: t.replace("fp32", dtype) for n, t in GATHER_GEMM.items()}
        yield "gather_gemm", sparse_conv._gather_gemm_kernel, typed, dict(BLOCK_M=64, BLOCK_K=bk, BLOCK_N=bn, ACC=acc,
                                                                          PRECISION=prec)
        part = "fp64" if dtype == "fp64" else "fp32"
        typed = {n: t.replace("fp32", part if n == "part_ptr" else dtype) for n, t in PAIR_GEMM.items()}
        yield "pair_gemm_t", sparse_conv._pair_gemm_t_kernel, typed, dict(BLOCK_P=32, BLOCK_K=bk, BLOCK_N=bn, ACC=acc,
                                                                          PRECISION=prec)


if __name__ == "__main__":
    for name, fn, sig, consts in variants():
        compiled = compile_kernel(fn, sig, consts)
        print(f"compiled {name} {consts}: {compiled.metadata.shared} B shared memory",
              flush=True)
