// Runs FxbComputeFeatures from the rewritten ExampleFeatures.mqh on bars read from stdin.
//
// Input:  first line the bar count, then one bar per line: time open high low close tick_volume
//         (time in seconds since 1970-01-01, prices in price units), oldest first.
// Output: first line the 52 feature names separated by spaces, then one line of 52 values
//         (%.17g) per bar after warm-up. Exit code 3 when FxbComputeFeatures returns false.
#include <cstdio>

#include "mql5_shim.h"
#include "example_features_rewritten.h"

int main()
{
    int count = 0;
    if (std::scanf("%d", &count) != 1 || count < 0)
    {
        std::fprintf(stderr, "features_driver: the first input line must be the bar count\n");
        return 2;
    }

    FxbArray<MqlRates> rates(static_cast<size_t>(count));
    for (int i = 0; i < count; i++)
    {
        MqlRates &bar = rates[static_cast<size_t>(i)];
        if (std::scanf("%lld %lf %lf %lf %lf %lld", &bar.time, &bar.open, &bar.high, &bar.low, &bar.close, &bar.tick_volume) != 6)
        {
            std::fprintf(stderr, "features_driver: bar %d is not 'time open high low close tick_volume'\n", i);
            return 2;
        }
        bar.spread = 0;
        bar.real_volume = 0;
    }

    for (int f = 0; f < FXB_FEATURES_COUNT; f++)
        std::printf(f == 0 ? "%s" : " %s", FXB_FEATURE_NAMES[f].c_str());
    std::printf("\n");

    FxbArray<double> features;
    if (!FxbComputeFeatures(rates, count, features))
        return 3;

    int rows = count - FXB_FEATURES_WARMUP_BARS;
    for (int r = 0; r < rows; r++)
    {
        for (int f = 0; f < FXB_FEATURES_COUNT; f++)
            std::printf(f == 0 ? "%.17g" : " %.17g", features[static_cast<size_t>(r * FXB_FEATURES_COUNT + f)]);
        std::printf("\n");
    }
    return 0;
}
