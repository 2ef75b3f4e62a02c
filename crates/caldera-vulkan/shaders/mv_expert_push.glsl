// Push-constant members the expert mat-vecs (MV_EXPERT, see mv_expert.glsl) add after
// those of mv.glsl / mvq.glsl.
    uint rpe;      // weight rows per expert (2 ff for gate|up pairs)
    uint slots;    // MV_SUM: slots summed; else slots served, one after another
    uint slot0;    // the first slot: its expert id is ids[slot0], its weight wts[slot0]
    uint e0;       // the first expert of this weight piece
    uint ne;       // experts in this piece
    uint x_stride; // input elements between slots (0: one input for every slot)
    uint y_stride; // output elements between slots (not MV_SUM)
    float alpha;   // MV_CLAMP: gpt-oss's clamped SwiGLU
    float limit;
