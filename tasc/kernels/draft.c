/* Draft kernels of TASC-spec: the lookups and the trie walk behind Proposer.propose.
 *
 * The numpy versions in tasc/draft.py are the reference; these return the same (tested).
 * SEP (-1) marks the end of a text in every token array. Outputs are caller-allocated.
 */
#include <stdint.h>

#define SEP (-1)

/* Greedy walk down the trie of continuation rows (tasc.draft.walk_continuations).
 *   rows int64 (R, W) row-major, R <= 4096; prior: a token chosen among n agreeing rows gets
 *   probability count / (n + prior); toks int64 (W,), probs float64 (W,) out; returns k.
 * At each column the most frequent token among the rows still agreeing is drafted (ties: the
 * smallest id, as np.unique + argmax); the walk stops at SEP or when no row is left. */
int tasc_walk(const int64_t *rows, int R, int W, double prior, int64_t *toks, double *probs) {
    int active[4096];
    int n = R < 4096 ? R : 4096, k = 0;
    for (int i = 0; i < n; i++) active[i] = i;
    for (int j = 0; j < W && n > 0; j++) {
        int64_t best = 0;
        int best_count = 0;
        for (int a = 0; a < n; a++) { /* mode of column j over the active rows, O(n^2), n small */
            int64_t v = rows[(int64_t)active[a] * W + j];
            int seen = 0, count = 0;
            for (int b = 0; b < a && !seen; b++) seen = rows[(int64_t)active[b] * W + j] == v;
            if (seen) continue;
            for (int b = a; b < n; b++) count += rows[(int64_t)active[b] * W + j] == v;
            if (count > best_count || (count == best_count && v < best)) best = v, best_count = count;
        }
        if (best == SEP) break;
        toks[k] = best;
        probs[k++] = best_count / (n + prior);
        if (best_count != n) {
            int m = 0;
            for (int a = 0; a < n; a++)
                if (rows[(int64_t)active[a] * W + j] == best) active[m++] = active[a];
            n = m;
        }
    }
    return k;
}

/* Corpus rows after one indexed n-gram (tasc.draft.BoundDraft.continuations, one level).
 *   keys uint32 (nk,) sorted window hashes; ends int32 (nk,) the window end of each key;
 *   padded int32 (ntok + 64,) the corpus tokens then 64 SEPs; pattern int64 (n,); key its
 *   hash. Occurrences beyond max_rows are thinned to an even spread: i-th pick =
 *   lo + i * (hi - 1 - lo) / (max_rows - 1) (integer division). Hash collisions are dropped.
 *   out int64 (max_rows, max_len) out, max_len <= 64; returns the rows written. */
int tasc_lookup(const uint32_t *keys, const int32_t *ends, int64_t nk, const int32_t *padded,
                const int64_t *pattern, int n, uint32_t key, int max_rows, int max_len, int64_t *out) {
    int64_t lo = 0, hi = nk;
    while (lo < hi) { int64_t mid = (lo + hi) / 2; if (keys[mid] < key) lo = mid + 1; else hi = mid; }
    int64_t first = lo;
    hi = nk;
    while (lo < hi) { int64_t mid = (lo + hi) / 2; if (keys[mid] <= key) lo = mid + 1; else hi = mid; }
    int64_t last = lo, count = last - first;
    int rows = 0;
    for (int64_t i = 0; i < (count < max_rows ? count : max_rows); i++) {
        int64_t at = count > max_rows ? first + i * (count - 1) / (max_rows - 1) : first + i;
        int64_t end = ends[at];
        int ok = 1;
        for (int t = 0; t < n && ok; t++) ok = padded[end - n + 1 + t] == pattern[t];
        if (!ok) continue;
        for (int t = 0; t < max_len; t++) out[(int64_t)rows * max_len + t] = padded[end + 1 + t];
        rows++;
    }
    return rows;
}

/* Prompt-lookup rows (tasc.draft.context_continuations): for the first level n in levels
 * (longest first) with L > n, what followed earlier occurrences of the context's last n
 * tokens, the most recent first, at most max_rows; each row SEP-padded to max_len.
 *   ctx int64 (L,); out int64 (max_rows, max_len); *matched = n (0: none); *span = how far
 *   the most recent occurrence matches the context's end, n..64 tokens; returns rows. */
int tasc_context_rows(const int64_t *ctx, int64_t L, const int *levels, int nlevels, int max_rows,
                      int max_len, int64_t *out, int *matched, int *span) {
    *matched = 0;
    *span = 0;
    for (int l = 0; l < nlevels; l++) {
        int n = levels[l], rows = 0;
        if (L <= n) continue;
        const int64_t *suffix = ctx + L - n;
        for (int64_t e = L - 2; e >= n - 1 && rows < max_rows; e--) {
            int ok = 1;
            for (int t = 0; t < n && ok; t++) ok = ctx[e - n + 1 + t] == suffix[t];
            if (!ok) continue;
            if (rows == 0) {
                int j = n;
                while (j < 64 && e - j >= 0 && ctx[e - j] == ctx[L - 1 - j]) j++;
                *span = j;
            }
            for (int t = 0; t < max_len; t++)
                out[(int64_t)rows * max_len + t] = e + 1 + t < L ? ctx[e + 1 + t] : SEP;
            rows++;
        }
        if (rows) { *matched = n; return rows; }
    }
    return 0;
}
