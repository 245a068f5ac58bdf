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
    int64_t col[4096];
    int n = R < 4096 ? R : 4096, k = 0;
    for (int i = 0; i < n; i++) active[i] = i;
    for (int j = 0; j < W && n > 0; j++) {
        int64_t best = rows[(int64_t)active[0] * W + j];
        int best_count = n;
        for (int a = 1; a < n; a++) /* the common case: every remaining row agrees, O(n) */
            if (rows[(int64_t)active[a] * W + j] != best) { best_count = 0; break; }
        if (!best_count) { /* mode of column j: sort a copy (insertion, n small), longest run */
            for (int a = 0; a < n; a++) {
                int64_t v = rows[(int64_t)active[a] * W + j];
                int b = a;
                while (b > 0 && col[b - 1] > v) { col[b] = col[b - 1]; b--; }
                col[b] = v;
            }
            for (int a = 0; a < n;) { /* ascending: the first longest run has the smallest id */
                int b = a;
                while (b < n && col[b] == col[a]) b++;
                if (b - a > best_count) best = col[a], best_count = b - a;
                a = b;
            }
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

/* The window hash of tasc.draft.hash_windows / hash_pattern, for one n-token pattern. */
static uint32_t hash_pattern(const int64_t *t, int n) {
    uint64_t h = 0;
    for (int j = 0; j < n; j++) h = (h ^ (uint64_t)t[j]) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    return (uint32_t)(h >> 32);
}

/* All levels of BoundDraft.continuations in one call: for n in levels (longest first) with
 * L >= n and an index, tasc_lookup of the context's last n tokens; the first level with rows
 * wins. keys/ends: per level, the addresses of that level's arrays; nks their lengths.
 *   *matched = n (0: none); returns rows. */
int tasc_lookup_levels(const uint64_t *keys, const uint64_t *ends, const int64_t *nks, const int *levels,
                       int nlevels, const int32_t *padded, const int64_t *ctx, int64_t L, int max_rows,
                       int max_len, int64_t *out, int *matched) {
    *matched = 0;
    for (int l = 0; l < nlevels; l++) {
        int n = levels[l];
        if (L < n || nks[l] == 0) continue;
        const int64_t *pattern = ctx + L - n;
        int rows = tasc_lookup((const uint32_t *)(uintptr_t)keys[l], (const int32_t *)(uintptr_t)ends[l], nks[l],
                               padded, pattern, n, hash_pattern(pattern, n), max_rows, max_len, out);
        if (rows) { *matched = n; return rows; }
    }
    return 0;
}

/* Prompt-lookup rows (tasc.draft.context_continuations): for the first level n in levels
 * (longest first) with L > n, what followed earlier occurrences of the context's last n
 * tokens, the most recent first, at most max_rows; each row SEP-padded to max_len.
 *   ctx int64 (L,); keys int64 (L,): what matching compares (the ids, or their match keys);
 *   out int64 (max_rows, max_len) rows of ctx; *matched = n (0: none); *span = how far the
 *   most recent occurrence matches the context's end, n..64 tokens; returns rows. */
int tasc_context_rows(const int64_t *ctx, const int64_t *keys, int64_t L, const int *levels, int nlevels,
                      int max_rows, int max_len, int64_t *out, int *matched, int *span) {
    *matched = 0;
    *span = 0;
    for (int l = 0; l < nlevels; l++) {
        int n = levels[l], rows = 0;
        if (L <= n) continue;
        const int64_t *suffix = keys + L - n;
        for (int64_t e = L - 2; e >= n - 1 && rows < max_rows; e--) {
            int ok = 1;
            for (int t = 0; t < n && ok; t++) ok = keys[e - n + 1 + t] == suffix[t];
            if (!ok) continue;
            if (rows == 0) {
                int j = n;
                while (j < 64 && e - j >= 0 && keys[e - j] == keys[L - 1 - j]) j++;
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

/* Fused for Proposer.propose (one call per source and step): the corpus rows of
 * tasc_lookup_levels walked by tasc_walk. rows: scratch int64 (max_rows, max_len). Returns k. */
int tasc_corpus_draft(const uint64_t *keys, const uint64_t *ends, const int64_t *nks, const int *levels,
                      int nlevels, const int32_t *padded, const int64_t *ctx, int64_t L, int max_rows,
                      int max_len, double prior, int64_t *rows, int64_t *toks, double *probs) {
    int matched;
    int R = tasc_lookup_levels(keys, ends, nks, levels, nlevels, padded, ctx, L, max_rows, max_len, rows, &matched);
    return R ? tasc_walk(rows, R, max_len, prior, toks, probs) : 0;
}

/* The context rows of tasc_context_rows walked by tasc_walk, the prior scaled by n / span when
 * use_span (tasc.proposer.ProposerConfig.context_span). *span as there. Returns k. */
int tasc_context_draft(const int64_t *ctx, const int64_t *keys, int64_t L, const int *levels, int nlevels,
                       int max_rows, int max_len, double prior, int use_span, int64_t *rows, int64_t *toks,
                       double *probs, int *span) {
    int matched;
    int R = tasc_context_rows(ctx, keys, L, levels, nlevels, max_rows, max_len, rows, &matched, span);
    if (!R) return 0;
    if (use_span && *span) prior *= (double)matched / *span;
    return tasc_walk(rows, R, max_len, prior, toks, probs);
}
