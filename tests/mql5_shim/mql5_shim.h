// Stand-ins for the MQL5 types and functions that mql5/FxBundle/ExampleFeatures.mqh uses, so
// that g++ can compile its function bodies for the cross-check against features.py.
//
// The test rewrites MQL5 array parameters (`const MqlRates &rates[]`) into references to
// FxbArray<T>, which is std::vector<T> here. Everything else in the include is plain C++.
#pragma once

#include <cmath>
#include <ctime>
#include <iostream>
#include <string>
#include <vector>

typedef std::string string;
// MQL5 datetime: seconds since 1970-01-01 00:00 in the server's clock, without a time zone.
typedef long long datetime;

struct MqlRates
{
    datetime time;
    double open;
    double high;
    double low;
    double close;
    long long tick_volume;
    int spread;
    long long real_volume;
};

struct MqlDateTime
{
    int year;
    int mon;
    int day;
    int hour;
    int min;
    int sec;
    int day_of_week;  // Sunday = 0, as in MQL5
    int day_of_year;
};

template <class T>
using FxbArray = std::vector<T>;

template <class T>
int ArraySize(const std::vector<T> &array)
{
    return static_cast<int>(array.size());
}

template <class T>
int ArrayResize(std::vector<T> &array, int size)
{
    array.resize(static_cast<size_t>(size));
    return size;
}

inline double MathLog(double x) { return std::log(x); }
inline double MathSqrt(double x) { return std::sqrt(x); }
inline double MathSin(double x) { return std::sin(x); }
inline double MathCos(double x) { return std::cos(x); }
inline double MathAbs(double x) { return std::fabs(x); }
inline double MathMax(double a, double b) { return a > b ? a : b; }
inline double MathMin(double a, double b) { return a < b ? a : b; }

// Uses the C library's calendar (gmtime_r), not the arithmetic of features.py, so that the
// cross-check compares two independent computations of hour and day of week.
inline bool TimeToStruct(datetime value, MqlDateTime &parts)
{
    std::time_t seconds = static_cast<std::time_t>(value);
    std::tm calendar;
    if (gmtime_r(&seconds, &calendar) == nullptr)
        return false;
    parts.year = calendar.tm_year + 1900;
    parts.mon = calendar.tm_mon + 1;
    parts.day = calendar.tm_mday;
    parts.hour = calendar.tm_hour;
    parts.min = calendar.tm_min;
    parts.sec = calendar.tm_sec;
    parts.day_of_week = calendar.tm_wday;
    parts.day_of_year = calendar.tm_yday;
    return true;
}

// MQL5's Print writes to the Experts journal; here it goes to stderr, where the test reads it.
template <class... Args>
void Print(const Args &...args)
{
    (std::cerr << ... << args);
    std::cerr << '\n';
}
