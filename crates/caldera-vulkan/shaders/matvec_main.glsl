// Needs `float row_dot(uint row, uint tid)`: this invocation's share of row `row`.
void main() {
    uint group = flat_group();
    uint tid = gl_LocalInvocationID.x;
    for (uint r = 0; r < ROWS; r++) {
        uint row = group * ROWS + r;
        if (row >= p.rows) {
            break; // uniform: the same for the whole workgroup
        }
        float s = reduce_sum(row_dot(row, tid));
        if (tid == 0u) {
            y[p.y_offset + row] = s;
        }
    }
}
