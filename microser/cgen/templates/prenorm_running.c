        st->pn_count++;
        st->pn_sum += (double)x;
        st->pn_sumsq += (double)(x * x);
        { /* torch: cumsum (double accumulation, float result) / count, var clamped at 0 */
            const float cnt = (float)st->pn_count${n0}, mu = (float)st->pn_sum / cnt;
            float var = ((float)st->pn_sumsq${n0v0}) / cnt - mu * mu;
            if (var < 0.0f) var = 0.0f;
            y = (x - mu) / (sqrtf(var) + ${eps});
        }
