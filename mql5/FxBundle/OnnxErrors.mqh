//+------------------------------------------------------------------+
//| OnnxErrors.mqh - names of the MQL5 ONNX runtime error codes      |
//+------------------------------------------------------------------+
// GetLastError() after a failed Onnx* call returns one of the codes 5800..5808 listed in the
// MQL5 reference (Runtime errors, ONNX section). Printing the name next to the number saves
// the user a look-up.
#ifndef FXB_ONNX_ERRORS_MQH
#define FXB_ONNX_ERRORS_MQH

string FxbOnnxErrorName(const int code)
  {
   switch(code)
     {
      case 5800:
         return "ERR_ONNX_INTERNAL";
      case 5801:
         return "ERR_ONNX_NOT_INITIALIZED";
      case 5802:
         return "ERR_ONNX_NOT_SUPPORTED";
      case 5803:
         return "ERR_ONNX_RUN_FAILED";
      case 5804:
         return "ERR_ONNX_INVALID_PARAMETERS_COUNT";
      case 5805:
         return "ERR_ONNX_INVALID_PARAMETER";
      case 5806:
         return "ERR_ONNX_INVALID_PARAMETER_TYPE";
      case 5807:
         return "ERR_ONNX_INVALID_PARAMETER_SIZE";
      case 5808:
         return "ERR_ONNX_WRONG_DIMENSION";
     }
   return "error " + IntegerToString(code);
  }

#endif // FXB_ONNX_ERRORS_MQH
