//+------------------------------------------------------------------+
//| ExampleFeatures.mqh - feature set "fxbundle-example-v1"          |
//+------------------------------------------------------------------+
// MQL5 port of compute_features() in builder/fxbundle/features.py: 52 causal features per
// bar, same formulas, same order, same zero-denominator rules. A change to one side must be
// made on the other and the feature-set name bumped; tests/test_mql5_features_crosscheck.py
// compiles this file with g++ and compares it with the Python code on real bars.
//
// Contract that every features include used by an fxbundle EA must meet:
//   #define FXB_FEATURES_COUNT        number of features per bar (the model's last input dim)
//   #define FXB_FEATURES_WARMUP_BARS  bars before a row that its features read
//   #define FXB_FEATURES_SET          feature-set name (optional; the EA compares it when defined)
//   bool FxbComputeFeatures(const MqlRates &rates[], const int count, double &features[])
//     rates     count bars OLDEST FIRST (index 0 is the oldest; not a series array)
//     features  resized to (count - FXB_FEATURES_WARMUP_BARS) * FXB_FEATURES_COUNT doubles,
//               row-major; row r holds the features of bar r + FXB_FEATURES_WARMUP_BARS
//     returns   false, after a Print, when the input cannot give one row
//
// Conventions shared with the Python side:
//   - prices in price units, volume = tick_volume;
//   - r[j] = ln(close[j] / close[j-1]);
//   - a rolling window of length n at bar i covers bars i-n+1 .. i;
//   - standard deviations are population (divide by n), computed in two passes like numpy,
//     and sums run in numpy's order (see FxbSum);
//   - a ratio whose denominator is zero is 0;
//   - hour and day of week come from the bar open time (day_of_week: Sunday = 0).
//
// The code stays in a C-like subset (no series arrays, classes or MQL5-only statements) so
// that the cross-check test can compile it as C++ after rewriting the dynamic arrays
// (`const double &values[]` parameters and `double name[];` locals) into std::vector.
#ifndef FXB_EXAMPLE_FEATURES_MQH
#define FXB_EXAMPLE_FEATURES_MQH

#define FXB_FEATURES_COUNT 52
#define FXB_FEATURES_WARMUP_BARS 100
#define FXB_FEATURES_SET "fxbundle-example-v1"

string FXB_FEATURE_NAMES[52] =
  {
   "log_return_1", "log_return_2", "log_return_3", "log_return_5", "log_return_8",
   "log_return_13", "log_return_21", "log_return_34", "log_return_55",
   "body", "range", "upper_wick", "lower_wick",
   "sma_ratio_5", "sma_ratio_10", "sma_ratio_20", "sma_ratio_50", "sma_ratio_100",
   "volatility_5", "volatility_10", "volatility_20", "volatility_50", "volatility_100",
   "atr_5", "atr_14", "atr_50",
   "rsi_7", "rsi_14", "rsi_28",
   "stochastic_5", "stochastic_14", "stochastic_50",
   "distance_high_20", "distance_low_20", "distance_high_100", "distance_low_100",
   "log_volume", "volume_ratio_20", "volume_ratio_100",
   "sma_cross_5_20", "sma_cross_20_100",
   "body_mean_10", "up_fraction_10", "up_fraction_50",
   "range_ratio_20", "volatility_ratio_5_50",
   "hour_sin", "hour_cos", "weekday_sin", "weekday_cos",
   "gap", "zscore_20"
  };

//+------------------------------------------------------------------+
//| Sum values[start .. start + n - 1] in numpy's order.              |
//+------------------------------------------------------------------+
// numpy (checked with 2.4) sums a contiguous run pairwise: fewer than 8 values in sequence,
// up to 128 values with 8 interleaved accumulators, longer runs split in halves. Matching that
// order makes every rolling mean and standard deviation bit-identical to features.py in the g++
// cross-check, so a difference there points to a formula, not to summation order.
double FxbSum(const double &values[], const int start, const int n)
  {
   if(n < 8)
     {
      double total = 0.0;
      for(int i = 0; i < n; i++)
         total += values[start + i];
      return total;
     }
   if(n <= 128)
     {
      double r0 = values[start];
      double r1 = values[start + 1];
      double r2 = values[start + 2];
      double r3 = values[start + 3];
      double r4 = values[start + 4];
      double r5 = values[start + 5];
      double r6 = values[start + 6];
      double r7 = values[start + 7];
      int i = 8;
      for(; i < n - (n % 8); i += 8)
        {
         r0 += values[start + i];
         r1 += values[start + i + 1];
         r2 += values[start + i + 2];
         r3 += values[start + i + 3];
         r4 += values[start + i + 4];
         r5 += values[start + i + 5];
         r6 += values[start + i + 6];
         r7 += values[start + i + 7];
        }
      double total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7));
      for(; i < n; i++)
         total += values[start + i];
      return total;
     }
   int half = n / 2;
   half -= half % 8;
   return FxbSum(values, start, half) + FxbSum(values, start + half, n - half);
  }

// Mean of the window of n values that ends at index i.
double FxbMean(const double &values[], const int i, const int n)
  {
   return FxbSum(values, i - n + 1, n) / n;
  }

// Population standard deviation of the window of n values that ends at index i, in two passes
// like numpy; squares is scratch space of at least n elements.
double FxbStd(const double &values[], const int i, const int n, double &squares[])
  {
   double mean = FxbMean(values, i, n);
   for(int k = 0; k < n; k++)
     {
      double deviation = values[i - n + 1 + k] - mean;
      squares[k] = deviation * deviation;
     }
   return MathSqrt(FxbSum(squares, 0, n) / n);
  }

double FxbHighest(const MqlRates &rates[], const int i, const int n)
  {
   double highest = rates[i - n + 1].high;
   for(int j = i - n + 2; j <= i; j++)
      highest = MathMax(highest, rates[j].high);
   return highest;
  }

double FxbLowest(const MqlRates &rates[], const int i, const int n)
  {
   double lowest = rates[i - n + 1].low;
   for(int j = i - n + 2; j <= i; j++)
      lowest = MathMin(lowest, rates[j].low);
   return lowest;
  }

// RSI centred on 0. A window without any price change gives 0 - 0.5 = -0.5, because the
// zero-denominator rule applies before the centring.
double FxbCentredRsi(const double &gains[], const double &losses[], const int i, const int n)
  {
   double gain_sum = FxbSum(gains, i - n + 1, n);
   double loss_sum = FxbSum(losses, i - n + 1, n);
   double total = gain_sum + loss_sum;
   double ratio = 0.0;
   if(total != 0.0)
      ratio = gain_sum / total;
   return ratio - 0.5;
  }

// Stochastic position centred on 0; a flat channel (highest == lowest) gives 0.
double FxbCentredStochastic(const MqlRates &rates[], const int i, const int n)
  {
   double highest = FxbHighest(rates, i, n);
   double lowest = FxbLowest(rates, i, n);
   if(highest == lowest)
      return 0.0;
   return (rates[i].close - lowest) / (highest - lowest) - 0.5;
  }

//+------------------------------------------------------------------+
//| Fill features with one row of 52 values per bar after warm-up.   |
//+------------------------------------------------------------------+
bool FxbComputeFeatures(const MqlRates &rates[], const int count, double &features[])
  {
   if(count <= FXB_FEATURES_WARMUP_BARS)
     {
      Print("FxbComputeFeatures: ", count, " bars given, but ", FXB_FEATURES_WARMUP_BARS + 1,
            " or more are needed (", FXB_FEATURES_WARMUP_BARS, " warm-up bars + 1)");
      return false;
     }
   if(ArraySize(rates) < count)
     {
      Print("FxbComputeFeatures: count is ", count, " but the rates array holds only ", ArraySize(rates), " bars");
      return false;
     }

   int rows = count - FXB_FEATURES_WARMUP_BARS;
   if(ArrayResize(features, rows * FXB_FEATURES_COUNT) != rows * FXB_FEATURES_COUNT)
     {
      Print("FxbComputeFeatures: cannot allocate ", rows * FXB_FEATURES_COUNT, " doubles");
      return false;
     }

   //--- per-bar series that the rolling windows read; index 0 of the bar-to-bar series is
   //--- never read, because every window starts at bar 1 or later
   double closes[];
   double log_returns[];
   double true_ranges[];
   double gains[];
   double losses[];
   double bodies[];
   double up_bars[];
   double bar_ranges[];
   double volumes[];
   double squares[];
   ArrayResize(closes, count);
   ArrayResize(log_returns, count);
   ArrayResize(true_ranges, count);
   ArrayResize(gains, count);
   ArrayResize(losses, count);
   ArrayResize(bodies, count);
   ArrayResize(up_bars, count);
   ArrayResize(bar_ranges, count);
   ArrayResize(volumes, count);
   ArrayResize(squares, count);

   for(int j = 0; j < count; j++)
     {
      closes[j] = rates[j].close;
      bodies[j] = (rates[j].close - rates[j].open) / rates[j].close;
      up_bars[j] = rates[j].close > rates[j].open ? 1.0 : 0.0;
      bar_ranges[j] = rates[j].high - rates[j].low;
      volumes[j] = (double)rates[j].tick_volume;
      log_returns[j] = 0.0;
      true_ranges[j] = 0.0;
      gains[j] = 0.0;
      losses[j] = 0.0;
      if(j > 0)
        {
         double previous_close = rates[j - 1].close;
         double change = rates[j].close - previous_close;
         log_returns[j] = MathLog(rates[j].close / previous_close);
         true_ranges[j] = MathMax(rates[j].high, previous_close) - MathMin(rates[j].low, previous_close);
         gains[j] = MathMax(change, 0.0);
         losses[j] = MathMax(-change, 0.0);
        }
     }

   for(int i = FXB_FEATURES_WARMUP_BARS; i < count; i++)
     {
      int row = (i - FXB_FEATURES_WARMUP_BARS) * FXB_FEATURES_COUNT;
      int f = 0;
      double c = rates[i].close;
      double o = rates[i].open;
      double h = rates[i].high;
      double low = rates[i].low;
      double v = volumes[i];

      //--- log returns over 1, 2, 3, 5, 8, 13, 21, 34, 55 bars
      features[row + f] = MathLog(c / rates[i - 1].close);  f++;
      features[row + f] = MathLog(c / rates[i - 2].close);  f++;
      features[row + f] = MathLog(c / rates[i - 3].close);  f++;
      features[row + f] = MathLog(c / rates[i - 5].close);  f++;
      features[row + f] = MathLog(c / rates[i - 8].close);  f++;
      features[row + f] = MathLog(c / rates[i - 13].close); f++;
      features[row + f] = MathLog(c / rates[i - 21].close); f++;
      features[row + f] = MathLog(c / rates[i - 34].close); f++;
      features[row + f] = MathLog(c / rates[i - 55].close); f++;

      //--- candle shape relative to the close
      features[row + f] = bodies[i];                     f++;
      features[row + f] = (h - low) / c;                 f++;
      features[row + f] = (h - MathMax(o, c)) / c;       f++;
      features[row + f] = (MathMin(o, c) - low) / c;     f++;

      double sma_5 = FxbMean(closes, i, 5);
      double sma_10 = FxbMean(closes, i, 10);
      double sma_20 = FxbMean(closes, i, 20);
      double sma_50 = FxbMean(closes, i, 50);
      double sma_100 = FxbMean(closes, i, 100);
      features[row + f] = c / sma_5 - 1.0;   f++;
      features[row + f] = c / sma_10 - 1.0;  f++;
      features[row + f] = c / sma_20 - 1.0;  f++;
      features[row + f] = c / sma_50 - 1.0;  f++;
      features[row + f] = c / sma_100 - 1.0; f++;

      double volatility_5 = FxbStd(log_returns, i, 5, squares);
      double volatility_50 = FxbStd(log_returns, i, 50, squares);
      features[row + f] = volatility_5;                             f++;
      features[row + f] = FxbStd(log_returns, i, 10, squares);      f++;
      features[row + f] = FxbStd(log_returns, i, 20, squares);      f++;
      features[row + f] = volatility_50;                            f++;
      features[row + f] = FxbStd(log_returns, i, 100, squares);     f++;

      features[row + f] = FxbMean(true_ranges, i, 5) / c;  f++;
      features[row + f] = FxbMean(true_ranges, i, 14) / c; f++;
      features[row + f] = FxbMean(true_ranges, i, 50) / c; f++;

      features[row + f] = FxbCentredRsi(gains, losses, i, 7);  f++;
      features[row + f] = FxbCentredRsi(gains, losses, i, 14); f++;
      features[row + f] = FxbCentredRsi(gains, losses, i, 28); f++;

      features[row + f] = FxbCentredStochastic(rates, i, 5);  f++;
      features[row + f] = FxbCentredStochastic(rates, i, 14); f++;
      features[row + f] = FxbCentredStochastic(rates, i, 50); f++;

      double highest_20 = FxbHighest(rates, i, 20);
      double lowest_20 = FxbLowest(rates, i, 20);
      double highest_100 = FxbHighest(rates, i, 100);
      double lowest_100 = FxbLowest(rates, i, 100);
      features[row + f] = (highest_20 - c) / c;  f++;
      features[row + f] = (c - lowest_20) / c;   f++;
      features[row + f] = (highest_100 - c) / c; f++;
      features[row + f] = (c - lowest_100) / c;  f++;

      //--- 1 + v is exact for any tick volume below 2^53, so MathLog(1 + v) matches numpy's
      //--- log1p(v) up to the last bit of the logarithm.
      features[row + f] = MathLog(1.0 + v);                                  f++;
      features[row + f] = MathLog((1.0 + v) / (1.0 + FxbMean(volumes, i, 20)));  f++;
      features[row + f] = MathLog((1.0 + v) / (1.0 + FxbMean(volumes, i, 100))); f++;

      features[row + f] = sma_5 / sma_20 - 1.0;   f++;
      features[row + f] = sma_20 / sma_100 - 1.0; f++;

      features[row + f] = FxbMean(bodies, i, 10);          f++;
      features[row + f] = FxbMean(up_bars, i, 10) - 0.5;   f++;
      features[row + f] = FxbMean(up_bars, i, 50) - 0.5;   f++;

      //--- a zero mean range makes the ratio 0, so the feature is 0 - 1 = -1
      double mean_range_20 = FxbMean(bar_ranges, i, 20);
      double range_ratio = 0.0;
      if(mean_range_20 != 0.0)
         range_ratio = bar_ranges[i] / mean_range_20;
      features[row + f] = range_ratio - 1.0; f++;

      double volatility_ratio = 0.0;
      if(volatility_5 > 0.0 && volatility_50 > 0.0)
         volatility_ratio = MathLog(volatility_5 / volatility_50);
      features[row + f] = volatility_ratio; f++;

      MqlDateTime open_time;
      if(!TimeToStruct(rates[i].time, open_time))
        {
         Print("FxbComputeFeatures: TimeToStruct failed for bar ", i, " (time ", (long)rates[i].time, ")");
         return false;
        }
      int hour = open_time.hour;
      int day_of_week = open_time.day_of_week;
      features[row + f] = MathSin(2.0 * M_PI * hour / 24.0);       f++;
      features[row + f] = MathCos(2.0 * M_PI * hour / 24.0);       f++;
      features[row + f] = MathSin(2.0 * M_PI * day_of_week / 7.0); f++;
      features[row + f] = MathCos(2.0 * M_PI * day_of_week / 7.0); f++;

      features[row + f] = MathLog(o / rates[i - 1].close); f++;

      double std_20 = FxbStd(closes, i, 20, squares);
      double zscore = 0.0;
      // A std below 1e-9 of the price is a rounding residue of a flat window, not a spread.
      if(std_20 > 1e-9 * c)
         zscore = (c - sma_20) / std_20;
      features[row + f] = zscore; f++;

      //--- guards the port itself: a missing or extra line above shifts every later column
      if(f != FXB_FEATURES_COUNT)
        {
         Print("FxbComputeFeatures: wrote ", f, " features per bar, expected ", FXB_FEATURES_COUNT);
         return false;
        }
     }
   return true;
  }

#endif // FXB_EXAMPLE_FEATURES_MQH
