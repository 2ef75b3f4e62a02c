// Push-constant members the expert mat-vecs (MV_EXPERT, see mv_expert.glsl) add after
// those of mv.glsl / mvq.glsl.
    uint rpe;      // weight rows per expert (2 ff for gate|up pairs)
    uint slots;    // slots per token (MV_SUM: summed into the token's outputs)
    uint slot0;    // the first slot: token t's slot j reads ids[slot0 + t id_stride + j]
    uint e0;       // the first expert of this weight piece
    uint ne;       // experts in this piece
    uint x_stride; // input elements between inputs (0: one input for every slot)
    uint y_stride; // output elements between slots (not MV_SUM)
    float alpha;   // MV_CLAMP: gpt-oss's clamped SwiGLU
    float limit;
    uint x_div;    // slots per input: slot s reads input s / x_div
    uint id_stride; // routing entries between tokens
